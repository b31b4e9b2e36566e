"""Tree fixtures (synthetic tree, debootstrap rootfs) and tree comparison."""
