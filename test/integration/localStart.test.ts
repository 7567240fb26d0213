import { execFileSync, spawn } from 'node:child_process';
import { describe, expect, it } from 'vitest';

const START = new URL('../../dist/src/local/start.js', import.meta.url).pathname;

interface Outcome {
  code: number | null;
  output: string;
  /** The processes `npm start` had started when the signal went out, and whether each still runs after it exited. */
  children: { pid: number; alive: boolean }[];
}

/**
 * `npm start` (the built start.js) in a process group of its own, as a terminal runs it; `signal` goes out once a line
 * matching `when` is printed, to the whole group (a Ctrl-C at the terminal) or to the process alone (`kill`).
 */
function startAndSignal(when: RegExp, signal: NodeJS.Signals, to: 'group' | 'process'): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [START, '--records', '15000'], {
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: {
        ...process.env,
        MDVM_EXPORTS: 'software-vulnerabilities,certificates',
        MDVM_COPY_MODE: 'stream',
        MDVM_COUNT_RECORDS: 'true',
      },
    });
    let output = '';
    let children: number[] = [];
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      if (children.length === 0 && when.test(output)) {
        const pid = child.pid as number;
        children = execFileSync('ps', ['-o', 'pid=', '--ppid', String(pid)])
          .toString()
          .trim()
          .split(/\s+/)
          .map(Number);
        process.kill(to === 'group' ? -pid : pid, signal);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', reject);
    child.on('exit', (code) => {
      setTimeout(() => {
        const outcome = children.map((pid) => {
          try {
            process.kill(pid, 0);
            return { pid, alive: true };
          } catch {
            return { pid, alive: false };
          }
        });
        // Nothing of this test outlives it.
        for (const c of outcome) if (c.alive) process.kill(c.pid, 'SIGKILL');
        resolve({ code, output, children: outcome });
      }, 1_000);
    });
  });
}

describe.skipIf(process.platform !== 'linux')('npm start (built, as a child process)', () => {
  it('Ctrl-C while copying: Azurite outlives the copies in flight, the run stops cleanly and Azurite is stopped', async () => {
    const result = await startAndSignal(/^Run 1/m, 'SIGINT', 'group');
    expect(result.output).not.toMatch(/npm start failed/);
    expect(result.output).toMatch(/interrupted: nothing is half-written/);
    expect(result.code).toBe(1);
    expect(result.children.length).toBeGreaterThan(0);
    expect(result.children.filter((c) => c.alive)).toEqual([]);
  });

  it('a SIGINT to the process alone while it publishes leaves no Azurite behind', async () => {
    const result = await startAndSignal(/Publishing/, 'SIGINT', 'process');
    expect(result.code).toBe(1);
    expect(result.children.length).toBeGreaterThan(0);
    expect(result.children.filter((c) => c.alive)).toEqual([]);
  });
});
