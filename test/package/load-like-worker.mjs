// Loads a Functions app folder the way the Azure Functions Node.js worker does for the v4 programming model,
// and prints what the app registered as one JSON line:
//   - the worker serves @azure/functions its core API at run time (here: worker-modules/, through NODE_PATH);
//   - it reads "main" (a path or a glob) and "type" from <app>/package.json;
//   - it loads each matching file with import() of its file URL when it is ES module code (.mjs, or .js under
//     "type": "module") and with require() otherwise;
//   - it locks registration once the entry points have loaded, then asks for the function metadata.
// Usage: NODE_PATH=<this folder>/worker-modules node load-like-worker.mjs <app folder>
import { globSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { extname, join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const appDir = resolve(process.argv[2] ?? '.');
const STATE = Symbol.for('mdvm.workerEmulation');
globalThis[STATE] ??= { functions: [], hooks: [], locked: false };
const state = globalThis[STATE];

function fail(stage, error) {
  process.stdout.write(
    `${JSON.stringify({ ok: false, stage, error: error instanceof Error ? `${error.name}: ${error.message}` : String(error) })}\n`,
  );
  process.exit(1);
}

let packageJson;
try {
  packageJson = JSON.parse(readFileSync(join(appDir, 'package.json'), 'utf8'));
} catch (error) {
  fail('package.json', error);
}
const main = typeof packageJson.main === 'string' ? packageJson.main : undefined;
if (!main) fail('package.json', new Error('package.json has no "main": the worker finds no entry point'));

process.chdir(appDir);
const files = globSync(main, { cwd: appDir }).sort();
if (files.length === 0) fail('entry point', new Error(`no file matches "main": "${main}" in ${appDir}`));

const isEsModule = (file) => {
  const ext = extname(file);
  if (ext === '.mjs') return true;
  if (ext === '.cjs') return false;
  return packageJson.type === 'module';
};

for (const file of files) {
  const path = join(appDir, file);
  try {
    if (isEsModule(file)) await import(pathToFileURL(path).href);
    else createRequire(path)(path);
  } catch (error) {
    fail(`loading ${file}`, error);
  }
}
state.locked = true;

process.stdout.write(
  `${JSON.stringify({
    ok: true,
    // The host starts the worker as `node <languageWorkers__node__arguments> <worker script> …`.
    execArgv: process.execArgv,
    entryPoints: files,
    programmingModel: state.programmingModel,
    hooks: state.hooks,
    functions: state.functions.map((f) => ({ ...f.metadata, handlerType: f.handlerType })),
  })}\n`,
);
process.exit(0);
