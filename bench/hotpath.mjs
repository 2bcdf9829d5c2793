// Runs one proxy-wasm module in Node's V8 behind a minimal host written here (no
// Envoy, no sockets), and times its request and response callbacks: what the
// module's own code costs per request in the engine Envoy embeds, with the host
// calls close to free. `bench/hotpath.py` writes the scenario and reads the result.
//
//   node bench/hotpath.mjs <module.wasm> <scenario.json>
//
// The scenario: { config, requests: [[name, value], ...] (one header list per
// request, used in turn), properties: {"source.address": "..."}, response:
// {headers, body} (sent when the module does not answer locally), warmup,
// iterations, profile (a path: write a V8 CPU profile there) }.
// Prints one JSON line: {"us_per_request", "local_replies", "host_calls"}.
import { readFile, writeFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
import { Session } from 'node:inspector/promises';

const [file, scenarioFile] = process.argv.slice(2);
const scenario = JSON.parse(await readFile(scenarioFile, 'utf8'));
const encoder = new TextEncoder();
const decoder = new TextDecoder();
const OK = 0, NOT_FOUND = 1, CAS_MISMATCH = 8;

let exports;
const memory = () => new DataView(exports.memory.buffer);
const bytesAt = (ptr, len) => new Uint8Array(exports.memory.buffer, ptr, len);
const textAt = (ptr, len) => decoder.decode(bytesAt(ptr, len));

// Hands bytes to the module the way a host does: in memory the module allocates.
function give(bytes, dataPtr, sizePtr) {
  const ptr = bytes.length ? exports.proxy_on_memory_allocate(bytes.length) : 0;
  if (bytes.length) bytesAt(ptr, bytes.length).set(bytes);
  memory().setUint32(dataPtr, ptr, true);
  memory().setUint32(sizePtr, bytes.length, true);
  return OK;
}

// The proxy-wasm header map serialization: count, (name, value) sizes, NUL-ended
// bytes. Kept per list: a list is never changed in place (edits make a new one),
// so the host's own cost stays out of what is timed.
const encodedMaps = new WeakMap();
function encodeMap(pairs) {
  let out = encodedMaps.get(pairs);
  if (!out) encodedMaps.set(pairs, out = encodeMapNow(pairs));
  return out;
}

function encodeMapNow(pairs) {
  const encoded = pairs.map(([n, v]) => [encoder.encode(n), encoder.encode(v)]);
  const size = 4 + 8 * encoded.length + encoded.reduce((sum, [n, v]) => sum + n.length + v.length + 2, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  view.setUint32(0, encoded.length, true);
  let at = 4;
  for (const [n, v] of encoded) { view.setUint32(at, n.length, true); view.setUint32(at + 4, v.length, true); at += 8; }
  for (const [n, v] of encoded) { out.set(n, at); at += n.length + 1; out.set(v, at); at += v.length + 1; }
  return out;
}

const config = encoder.encode(typeof scenario.config === 'string' ? scenario.config : JSON.stringify(scenario.config));
const properties = Object.fromEntries(Object.entries(scenario.properties ?? {}).map(([k, v]) => [k, encoder.encode(v)]));
const shared = new Map(); // key -> {value, cas}
let nextCas = 1;
const maps = { 0: [], 2: [] };
let responseBody = new Uint8Array(0);
let localReplies = 0, hostCalls = 0;
const now = () => BigInt(Date.now()) * 1000000n;

const env = {
  proxy_log: (level, ptr, size) => { if (level >= 3) console.error(textAt(ptr, size)); return OK; },
  proxy_get_log_level: (ptr) => { memory().setUint32(ptr, 2, true); return OK; },
  proxy_get_current_time_nanoseconds: (ptr) => { hostCalls++; memory().setBigUint64(ptr, now(), true); return OK; },
  proxy_set_tick_period_milliseconds: () => OK,
  proxy_get_buffer_bytes: (type, start, max, dataPtr, sizePtr) => {
    hostCalls++;
    const buffer = type === 7 || type === 6 ? (type === 7 ? config : new Uint8Array(0)) : type === 1 ? responseBody : null;
    if (buffer === null) return NOT_FOUND;
    // Sizes are u32 (`usize::MAX` for "all"): JS sees them as signed.
    return give(buffer.subarray(start >>> 0, (start >>> 0) + (max >>> 0)), dataPtr, sizePtr);
  },
  proxy_get_header_map_pairs: (map, dataPtr, sizePtr) => { hostCalls++; return give(encodeMap(maps[map] ?? []), dataPtr, sizePtr); },
  proxy_get_header_map_value: (map, keyPtr, keySize, dataPtr, sizePtr) => {
    hostCalls++;
    const name = textAt(keyPtr, keySize);
    const found = (maps[map] ?? []).find(([n]) => n === name);
    return found ? give(encoder.encode(found[1]), dataPtr, sizePtr) : NOT_FOUND;
  },
  proxy_replace_header_map_value: (map, keyPtr, keySize, valuePtr, valueSize) => {
    hostCalls++;
    const name = textAt(keyPtr, keySize);
    const list = (maps[map] ?? []).filter(([n]) => n !== name);
    list.push([name, textAt(valuePtr, valueSize)]);
    maps[map] = list;
    return OK;
  },
  proxy_add_header_map_value: (map, keyPtr, keySize, valuePtr, valueSize) => {
    hostCalls++;
    maps[map] = [...(maps[map] ?? []), [textAt(keyPtr, keySize), textAt(valuePtr, valueSize)]];
    return OK;
  },
  proxy_remove_header_map_value: (map, keyPtr, keySize) => {
    hostCalls++;
    const name = textAt(keyPtr, keySize);
    maps[map] = (maps[map] ?? []).filter(([n]) => n !== name);
    return OK;
  },
  proxy_set_header_map_pairs: () => OK,
  proxy_get_property: (pathPtr, pathSize, dataPtr, sizePtr) => {
    hostCalls++;
    const path = textAt(pathPtr, pathSize).split('\0').filter(Boolean).join('.');
    return path in properties ? give(properties[path], dataPtr, sizePtr) : NOT_FOUND;
  },
  proxy_set_property: () => { hostCalls++; return OK; },
  proxy_get_shared_data: (keyPtr, keySize, dataPtr, sizePtr, casPtr) => {
    hostCalls++;
    const entry = shared.get(textAt(keyPtr, keySize));
    if (!entry) return NOT_FOUND;
    memory().setUint32(casPtr, entry.cas, true);
    return give(entry.value, dataPtr, sizePtr);
  },
  proxy_set_shared_data: (keyPtr, keySize, valuePtr, valueSize, cas) => {
    hostCalls++;
    const key = textAt(keyPtr, keySize);
    const entry = shared.get(key);
    if (cas !== 0 && entry && entry.cas !== cas) return CAS_MISMATCH;
    shared.set(key, { value: bytesAt(valuePtr, valueSize).slice(), cas: nextCas++ });
    return OK;
  },
  proxy_define_metric: (type, namePtr, nameSize, idPtr) => { memory().setUint32(idPtr, ++nextCas, true); return OK; },
  proxy_increment_metric: () => { hostCalls++; return OK; },
  proxy_record_metric: () => { hostCalls++; return OK; },
  proxy_get_metric: (id, ptr) => { memory().setBigUint64(ptr, 0n, true); return OK; },
  proxy_send_local_response: () => { hostCalls++; localReplies++; return OK; },
  proxy_continue_stream: () => OK,
  proxy_close_stream: () => OK,
  proxy_call_foreign_function: () => NOT_FOUND,
};

const module = await WebAssembly.compile(await readFile(file));
const wasi = new WASI({ version: 'preview1', args: [], env: {}, returnOnExit: true });
const imports = { ...wasi.getImportObject(), env: {} };
for (const entry of WebAssembly.Module.imports(module)) {
  if (entry.module.startsWith('wasi_')) continue;
  imports[entry.module] ??= {};
  imports[entry.module][entry.name] = env[entry.name] ?? (() => { throw new Error(`host call ${entry.name} is not part of this bench host`); });
}
const instance = await WebAssembly.instantiate(module, imports);
exports = instance.exports;
wasi.initialize(instance);

const ROOT = 1;
exports.proxy_on_context_create(ROOT, 0);
if (!exports.proxy_on_vm_start(ROOT, 0)) throw new Error('vm start refused');
if (!exports.proxy_on_configure(ROOT, config.length)) throw new Error('configuration refused');

let context = ROOT;
function request(headers) {
  const id = ++context;
  maps[0] = headers;
  maps[2] = [];
  exports.proxy_on_context_create(id, ROOT);
  const repliesBefore = localReplies;
  exports.proxy_on_request_headers(id, headers.length, 1);
  if (localReplies === repliesBefore && scenario.response) {
    maps[2] = scenario.response.headers;
    responseBody = encoder.encode(scenario.response.body ?? '');
    exports.proxy_on_response_headers?.(id, maps[2].length, responseBody.length ? 0 : 1);
    if (responseBody.length) exports.proxy_on_response_body?.(id, responseBody.length, 1);
  }
  // As a host does, only the callbacks the module exports (see scripts/trim_callbacks.py).
  exports.proxy_on_log?.(id);
  exports.proxy_on_done?.(id);
  exports.proxy_on_delete(id);
}

const requests = scenario.requests;
for (let n = 0; n < (scenario.warmup ?? 2000); n++) request(requests[n % requests.length]);
let session;
if (scenario.profile) {
  session = new Session();
  session.connect();
  await session.post('Profiler.enable');
  await session.post('Profiler.setSamplingInterval', { interval: 20 });
  await session.post('Profiler.start');
}
localReplies = 0; hostCalls = 0;
const iterations = scenario.iterations ?? 100000;
const start = process.hrtime.bigint();
for (let n = 0; n < iterations; n++) request(requests[n % requests.length]);
const elapsed = Number(process.hrtime.bigint() - start) / 1000;
if (session) {
  const { profile } = await session.post('Profiler.stop');
  await writeFile(scenario.profile, JSON.stringify(profile));
}
console.log(JSON.stringify({ us_per_request: elapsed / iterations, local_replies: localReplies / iterations, host_calls: hostCalls / iterations }));
