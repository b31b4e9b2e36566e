"""A tiny client for containerd's CRI image service (what kubelet calls to pull).

`ctr image pull` passes no snapshotter labels, so nydus-snapshotter cannot tell a Nydus image from
an OCI one; kubelet pulls through CRI `ImageService/PullImage`, which does.  Debian 12 has no
`crictl`, so this speaks gRPC with grpcio and encodes the few CRI messages by hand (protobuf wire
format: field key = number << 3 | wire type, length-delimited strings and sub-messages).

    python3 tests/cri_client.py --socket /run/containerd/containerd.sock pull REF [--user U:P]
    python3 tests/cri_client.py --socket ... remove REF
"""

from __future__ import annotations

import argparse
import sys

import grpc

SERVICE = "/runtime.v1.ImageService"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings, bytes, sub-messages, map entries."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _str(number: int, value: str) -> bytes:
    return _field(number, value.encode()) if value else b""


def image_spec(ref: str, annotations: dict[str, str] | None = None) -> bytes:
    # ImageSpec { string image = 1; map<string, string> annotations = 2; }
    out = _str(1, ref)
    for k, v in sorted((annotations or {}).items()):
        out += _field(2, _str(1, k) + _str(2, v))
    return out


def auth_config(username: str = "", password: str = "", server: str = "") -> bytes:
    # AuthConfig { username = 1; password = 2; auth = 3; server_address = 4; ... }
    return _str(1, username) + _str(2, password) + _str(4, server)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def decode_strings(buf: bytes) -> dict[int, str]:
    """The length-delimited top-level fields of a message, as text (enough for responses here)."""
    out: dict[int, str] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            out[key >> 3] = buf[pos:pos + n].decode(errors="replace")
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


class CRIImages:
    def __init__(self, socket: str, timeout: float = 300.0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CRIImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: bytes) -> bytes:
        fn = self.channel.unary_unary(
            f"{SERVICE}/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        result: bytes = fn(request, timeout=self.timeout)
        return result

    def pull(self, ref: str, username: str = "", password: str = "") -> str:
        """PullImageRequest { ImageSpec image = 1; AuthConfig auth = 2; PodSandboxConfig = 3 };
        returns PullImageResponse.image_ref."""
        req = _field(1, image_spec(ref))
        if username or password:
            req += _field(2, auth_config(username, password))
        return decode_strings(self._call("PullImage", req)).get(1, "")

    def remove(self, ref: str) -> None:
        """RemoveImageRequest { ImageSpec image = 1; }"""
        self._call("RemoveImage", _field(1, image_spec(ref)))

    def status(self, ref: str) -> bool:
        """ImageStatusRequest { ImageSpec image = 1; bool verbose = 2; }: is the image known?"""
        resp = self._call("ImageStatus", _field(1, image_spec(ref)))
        return bool(resp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pull")
    p.add_argument("ref")
    p.add_argument("--user", default="", help="USER:PASSWORD")
    r = sub.add_parser("remove")
    r.add_argument("ref")
    args = ap.parse_args(argv)
    try:
        with CRIImages(args.socket) as cri:
            if args.cmd == "pull":
                user, _, pw = args.user.partition(":")
                print(cri.pull(args.ref, user, pw))
            else:
                cri.remove(args.ref)
    except grpc.RpcError as e:
        print(f"cri_client: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
