#!/usr/bin/env python3
"""OCI images of the modules, in the two formats Istio's WasmPlugin and Envoy
Gateway's EnvoyExtensionPolicy pull, written as OCI image layouts directly.

  oci.py build          dist/oci/<module>/ (an OCI layout with two tags per module:
                        `compat` and `wasm`, see below)
  oci.py test           starts Debian's docker-registry on a free port, pushes every
                        image, pulls it back and checks media types, the annotation
                        and that the extracted module is byte for byte dist/<module>.wasm
  oci.py push REGISTRY  pushes every image to REGISTRY/<module>:{compat,wasm} (plain HTTP
                        registries only, e.g. a local one; use skopeo/crane for others)

Formats:
- "compat" (Istio's and Envoy Gateway's default): an ordinary image whose one
  tar+gzip layer holds `plugin.wasm`, manifest annotation
  `module.wasm.image/variant=compat`.
- "wasm" (the Wasm OCI artifact spec): config `application/vnd.module.wasm.config.v1+json`,
  one layer `application/vnd.module.wasm.content.layer.v1+wasm` that is the module.
Builds are reproducible: fixed timestamps, owners and gzip headers.
"""

import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
OUT = DIST / "oci"
MODULES = ["routing", "ratelimit", "auth", "cache", "aggregate"]
VERSION = "0.1.0"

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
VARIANT = "module.wasm.image/variant"


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type, data, **extra):
    return {"mediaType": media_type, "digest": digest(data), "size": len(data), **extra}


def canonical(document):
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def compat_image(module, wasm):
    """(manifest bytes, {digest: blob}) of the compat variant."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mode, info.mtime, info.uid, info.gid = len(wasm), 0o444, 0, 0, 0
        tar.addfile(info, io.BytesIO(wasm))
    tar_data = tar_bytes.getvalue()
    layer = gzip.compress(tar_data, mtime=0)
    config = canonical({
        "architecture": "amd64", "os": "linux",
        "config": {"Labels": {"org.opencontainers.image.title": f"{module}.wasm"}},
        "rootfs": {"type": "layers", "diff_ids": [digest(tar_data)]},
    })
    manifest = canonical({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": descriptor(IMAGE_CONFIG, config),
        "layers": [descriptor(TAR_GZIP_LAYER, layer)],
        "annotations": {VARIANT: "compat", "org.opencontainers.image.title": module,
                        "org.opencontainers.image.version": VERSION},
    })
    return manifest, {digest(config): config, digest(layer): layer}


def wasm_image(module, wasm):
    """(manifest bytes, {digest: blob}) of the Wasm artifact variant."""
    config = canonical({"author": "wasm-gateway", "description": f"{module}.wasm, a proxy-wasm filter",
                        "abiVersion": "proxy_abi_version_0_2_1"})
    manifest = canonical({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": descriptor(WASM_CONFIG, config),
        "layers": [descriptor(WASM_LAYER, wasm, annotations={"org.opencontainers.image.title": "plugin.wasm"})],
        "annotations": {"org.opencontainers.image.title": module, "org.opencontainers.image.version": VERSION},
    })
    return manifest, {digest(config): config, digest(wasm): wasm}


def images(module):
    wasm = (DIST / f"{module}.wasm").read_bytes()
    return {"compat": compat_image(module, wasm), "wasm": wasm_image(module, wasm)}


def build():
    for module in MODULES:
        layout = OUT / module
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}
        for tag, (manifest, parts) in images(module).items():
            for name, blob in {**parts, digest(manifest): manifest}.items():
                (blobs / name.split(":", 1)[1]).write_bytes(blob)
            index["manifests"].append(descriptor(MANIFEST, manifest,
                                                 annotations={"org.opencontainers.image.ref.name": tag}))
        (layout / "index.json").write_bytes(canonical(index))
        print(f"  {layout.relative_to(ROOT)}: tags compat, wasm")


def request(method, url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def push(registry, module):
    for tag, (manifest, parts) in images(module).items():
        for name, blob in parts.items():
            _, headers, _ = request("POST", f"http://{registry}/v2/{module}/blobs/uploads/")
            location = headers["Location"]
            if location.startswith("/"):
                location = f"http://{registry}{location}"
            separator = "&" if "?" in location else "?"
            status, _, _ = request("PUT", f"{location}{separator}digest={name}", blob,
                                   {"Content-Type": "application/octet-stream"})
            assert status == 201, (module, name, status)
        status, _, _ = request("PUT", f"http://{registry}/v2/{module}/manifests/{tag}", manifest,
                               {"Content-Type": MANIFEST})
        assert status == 201, (module, tag, status)


def pull_and_check(registry, module):
    built = digest((DIST / f"{module}.wasm").read_bytes())
    for tag in ("compat", "wasm"):
        _, headers, body = request("GET", f"http://{registry}/v2/{module}/manifests/{tag}",
                                   headers={"Accept": MANIFEST})
        manifest = json.loads(body)
        assert manifest["mediaType"] == MANIFEST, manifest
        [layer] = manifest["layers"]
        _, _, blob = request("GET", f"http://{registry}/v2/{module}/blobs/{layer['digest']}")
        assert digest(blob) == layer["digest"], f"{module}:{tag}: layer digest mismatch"
        if tag == "compat":
            assert manifest["annotations"][VARIANT] == "compat", manifest
            assert manifest["config"]["mediaType"] == IMAGE_CONFIG, manifest
            assert layer["mediaType"] == TAR_GZIP_LAYER, layer
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
                assert tar.getnames() == ["plugin.wasm"], tar.getnames()
                extracted = tar.extractfile("plugin.wasm").read()
        else:
            assert VARIANT not in manifest.get("annotations", {}), manifest
            assert manifest["config"]["mediaType"] == WASM_CONFIG, manifest
            assert layer["mediaType"] == WASM_LAYER, layer
            extracted = blob
        assert digest(extracted) == built, f"{module}:{tag}: the module is not dist/{module}.wasm"
        assert extracted[:4] == b"\0asm", f"{module}:{tag}: not a Wasm module"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test():
    workdir = Path(tempfile.mkdtemp(prefix="oci-registry-"))
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(f"version: 0.1\nlog: {{level: error}}\nstorage:\n  filesystem: {{rootdirectory: {workdir / 'data'}}}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    registry = subprocess.Popen(["docker-registry", "serve", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.time()
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 20
        while True:
            try:
                request("GET", f"http://{address}/v2/")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.time() > deadline or registry.poll() is not None:
                    sys.exit("docker-registry did not start")
                time.sleep(0.05)
        for module in MODULES:
            push(address, module)
            pull_and_check(address, module)
        print(f"oci images ok: {len(MODULES)} modules x (compat, wasm) pushed to and pulled from "
              f"docker-registry, media types, annotation and module digests checked ({time.time() - started:.1f} s)")
    finally:
        registry.kill()
        registry.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "build"
    if command == "build":
        build()
    elif command == "test":
        test()
    elif command == "push" and len(sys.argv) == 3:
        for name in MODULES:
            push(sys.argv[2], name)
    else:
        sys.exit(__doc__)
