// Runs a Rust test binary built for wasm32-wasip1 in Node.js's V8 (its WASI),
// as cargo's runner: `make unit-wasm`. The module's proxy-wasm imports are
// functions that throw: unit tests never call the host.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
const [file, ...args] = process.argv.slice(2);
const wasi = new WASI({ version: 'preview1', args: [file, ...args], env: process.env, preopens: { '/': '/' }, returnOnExit: true });
const module = await WebAssembly.compile(await readFile(file));
const imports = wasi.getImportObject();
for (const entry of WebAssembly.Module.imports(module)) {
  if (entry.module.startsWith("wasi_")) continue;
  imports[entry.module] ??= {};
  imports[entry.module][entry.name] = () => { throw new Error(`host function ${entry.name} called in a unit test`); };
}
const instance = await WebAssembly.instantiate(module, imports);
// proxy_wasm::main! exports _initialize next to the test harness's _start; node runs one.
const { _initialize, ...exports } = instance.exports;
process.exitCode = wasi.start({ exports });
