import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';

/** The CLI tests run the built CLI as child processes: build once before any test file. */
export default function setup(): void {
  const require = createRequire(import.meta.url);
  const tsc = require.resolve('typescript/bin/tsc');
  execFileSync(process.execPath, [tsc, '-p', 'tsconfig.build.json'], { stdio: 'inherit' });
}
