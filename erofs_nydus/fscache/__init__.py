"""fscache."""
