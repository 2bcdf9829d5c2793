#!/usr/bin/env python3
"""Removes the per-request callbacks a module does not handle from its exports.

The proxy-wasm SDK exports every callback (`proxy_on_response_body`, `proxy_on_log`,
...) whether the module uses it or not, and a host calls every exported one: for a
response body that is one call into the VM per chunk, per module, doing nothing.
The ABI makes callbacks optional (a host calls only those exported; Envoy checks each
before calling), so a module that declares the stream callbacks it handles, with
`gateway_common::stream_callbacks!`, is built exporting only those.

The declaration is the custom section `gateway.stream_callbacks` (names separated by
newlines), removed here. Callbacks outside TRIMMABLE (context creation and deletion,
configuration, ticks, calls answered, memory) are always kept. A module without the
section is copied unchanged.

usage: trim_callbacks.py IN.wasm OUT.wasm
"""

import sys

SECTION = "gateway.stream_callbacks"
# The callbacks of one HTTP stream a module may leave out.
TRIMMABLE = {"request_headers", "request_body", "request_trailers", "response_headers", "response_body",
             "response_trailers", "log", "done"}
CUSTOM_SECTION, EXPORT_SECTION = 0, 7


def read_uleb(data, offset):
    value, shift = 0, 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7


def uleb(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def sections(module):
    """(id, content) of each section after the 8-byte header."""
    offset = 8
    while offset < len(module):
        section_id = module[offset]
        size, start = read_uleb(module, offset + 1)
        yield section_id, module[start:start + size]
        offset = start + size


def custom_section_name(content):
    length, start = read_uleb(content, 0)
    return content[start:start + length].decode(), start + length


def declared_callbacks(module):
    for section_id, content in sections(module):
        if section_id == CUSTOM_SECTION:
            name, start = custom_section_name(content)
            if name == SECTION:
                return {line for line in content[start:].decode().split("\n") if line}
    return None


def trimmed_exports(content, handled):
    count, offset = read_uleb(content, 0)
    kept = []
    for _ in range(count):
        start = offset
        length, offset = read_uleb(content, offset)
        name = content[offset:offset + length].decode()
        offset += length + 1  # the kind byte
        _, offset = read_uleb(content, offset)  # the index
        callback = name.removeprefix("proxy_on_")
        if name.startswith("proxy_on_") and callback in TRIMMABLE and callback not in handled:
            continue
        kept.append(content[start:offset])
    return uleb(len(kept)) + b"".join(kept)


def trim(module):
    handled = declared_callbacks(module)
    if handled is None:
        return module
    unknown = handled - TRIMMABLE
    if unknown:
        raise SystemExit(f"{SECTION} names unknown callbacks: {', '.join(sorted(unknown))}")
    out = bytearray(module[:8])
    for section_id, content in sections(module):
        if section_id == CUSTOM_SECTION and custom_section_name(content)[0] == SECTION:
            continue
        if section_id == EXPORT_SECTION:
            content = trimmed_exports(content, handled)
        out += bytes([section_id]) + uleb(len(content)) + content
    return bytes(out)


def main():
    source, target = sys.argv[1:3]
    with open(source, "rb") as module:
        trimmed = trim(module.read())
    with open(target, "wb") as out:
        out.write(trimmed)


if __name__ == "__main__":
    main()
