import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { unzipSync } from 'fflate';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EXPORT_IDS } from '../../src/core/catalog.js';
import { loadConfig } from '../../src/core/config.js';
import { createRuntime } from '../../src/core/runtime.js';
import { buildFunctionPackage, PackageError, ZIP_NAME } from '../../src/deploy/functionPackage.js';
import { NODE_ARGUMENTS } from '../../src/deploy/nodeArguments.js';
import {
  COPY_FUNCTION_NAME,
  DERIVE_FUNCTION_NAME,
  functionSpecs,
  QUEUE_CONNECTION,
  timerFunctionName,
} from '../../src/functions/specs.js';
import { exampleAppSettings } from '../infra/bicepSettings.js';

/**
 * What azd deploys, proven: `npm run package` builds the zip, the zip is unpacked into an empty folder outside
 * the repository, nothing is installed, and the entry point its package.json names is loaded the way the
 * Functions Node worker loads it (test/package/load-like-worker.mjs), with exactly the app settings the Bicep
 * gives the Function App.
 */
const root = fileURLToPath(new URL('../..', import.meta.url));
const infra = join(root, 'infra');
const loader = join(root, 'test/package/load-like-worker.mjs');
const workerModules = join(root, 'test/package/worker-modules');

interface LoadReport {
  ok: boolean;
  stage?: string;
  error?: string;
  execArgv?: string[];
  entryPoints?: string[];
  programmingModel?: { name: string; version: string };
  functions?: {
    name: string;
    handlerType: string;
    bindings: Record<string, Record<string, unknown>>;
  }[];
}

const temporary: string[] = [];
function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  temporary.push(dir);
  return dir;
}

function unpack(zipPath: string): string {
  const dir = tempDir('mdvm-package-');
  for (const [name, data] of Object.entries(unzipSync(readFileSync(zipPath)))) {
    if (name.endsWith('/')) continue;
    const target = join(dir, name);
    mkdirSync(dirname(target), { recursive: true });
    writeFileSync(target, data);
  }
  return dir;
}

/**
 * Load the app folder in a fresh Node process, as the worker would: only the given settings in its environment, and
 * languageWorkers__node__arguments on its command line before the worker's script, where the Functions host puts them.
 */
function loadLikeWorker(appDir: string, settings: Record<string, string>): LoadReport {
  const nodeArguments = (settings.languageWorkers__node__arguments ?? '').split(/\s+/).filter(Boolean);
  const result = spawnSync(process.execPath, [...nodeArguments, loader, appDir], {
    cwd: appDir,
    encoding: 'utf8',
    env: { PATH: process.env.PATH ?? '', NODE_PATH: workerModules, ...settings },
    timeout: 60_000,
  });
  const line = result.stdout.trim().split('\n').pop() ?? '';
  try {
    return JSON.parse(line) as LoadReport;
  } catch {
    throw new Error(`the loader printed no report (exit ${result.status}): ${result.stdout}\n${result.stderr}`);
  }
}

let packageDir: string;
let zipPath: string;
let zipFiles: string[];
let settings: Record<string, string>;

beforeAll(() => {
  // Exactly the command azd's prepackage hook runs (azure.yaml).
  const built = spawnSync('npm', ['run', 'package', '--silent'], { cwd: root, encoding: 'utf8' });
  expect(built.status, `npm run package failed:\n${built.stdout}\n${built.stderr}`).toBe(0);
  zipPath = join(root, 'build', ZIP_NAME);
  zipFiles = Object.keys(unzipSync(readFileSync(zipPath))).sort();
  packageDir = unpack(zipPath);
}, 180_000);

beforeAll(async () => {
  settings = await exampleAppSettings(infra);
});

// Unpacked packages hold a production node_modules each: on a busy 2-core machine removing them outlasts the default
// hook timeout.
afterAll(() => {
  for (const dir of temporary.splice(0)) rmSync(dir, { recursive: true, force: true });
}, 300_000);

describe('the deployment package (npm run package)', () => {
  it('registers every function from a clean folder, with the names, schedule and connection the Bicep provides', () => {
    const report = loadLikeWorker(packageDir, settings);
    expect(report, JSON.stringify(report)).toMatchObject({ ok: true, entryPoints: ['dist/src/functions/index.js'] });
    // Node accepted the worker's arguments from the Bicep (an unknown flag stops it before the app loads).
    expect(report.execArgv).toEqual([...NODE_ARGUMENTS]);
    expect(report.programmingModel?.name).toBe('@azure/functions');

    const functions = report.functions ?? [];
    const trigger = (name: string) => Object.values(functions.find((f) => f.name === name)?.bindings ?? {})[0];
    // MDVM_EXPORTS from the Bicep is 'all': one timer per export type, the copy-part and derive queue triggers.
    expect(settings.MDVM_EXPORTS).toBe('all');
    expect(functions.map((f) => f.name).sort()).toEqual(
      [...EXPORT_IDS.map(timerFunctionName), COPY_FUNCTION_NAME, DERIVE_FUNCTION_NAME].sort(),
    );
    for (const f of functions) expect(f.handlerType, f.name).toBe('function');
    for (const id of EXPORT_IDS) {
      expect(trigger(timerFunctionName(id))).toMatchObject({
        type: 'timerTrigger',
        direction: 'in',
        schedule: settings.MDVM_SCHEDULE,
        runOnStartup: false,
        useMonitor: true,
      });
    }
    expect(trigger(COPY_FUNCTION_NAME)).toMatchObject({
      type: 'queueTrigger',
      direction: 'in',
      queueName: settings.MDVM_PARTS_QUEUE,
      connection: QUEUE_CONNECTION,
    });
    expect(trigger(DERIVE_FUNCTION_NAME)).toMatchObject({
      type: 'queueTrigger',
      direction: 'in',
      queueName: settings.MDVM_DERIVE_QUEUE,
      connection: QUEUE_CONNECTION,
    });
    // The connection is identity-based: the host builds it from <connection>__queueServiceUri + credential.
    expect(settings[`${QUEUE_CONNECTION}__queueServiceUri`]).toMatch(/^https:\/\/.+\.queue\.core\.windows\.net\/$/);
    expect(settings[`${QUEUE_CONNECTION}__credential`]).toBe('managedidentity');
    expect(settings[QUEUE_CONNECTION]).toBeUndefined();
    // ...and the queue it listens on is the one the runtime storage module creates.
    const runtimeStorage = readFileSync(join(infra, 'modules/runtime-storage.bicep'), 'utf8');
    expect(runtimeStorage).toContain(`param partsQueueName string = '${settings.MDVM_PARTS_QUEUE}'`);
    expect(runtimeStorage).toContain(`param deriveQueueName string = '${settings.MDVM_DERIVE_QUEUE}'`);
  });

  it('registers exactly the function specs the in-process host drives (mdvm-ingest run, npm start, the tests)', () => {
    const report = loadLikeWorker(packageDir, settings);
    const registered = (report.functions ?? []).map((f) => {
      const { type, schedule, runOnStartup, useMonitor, queueName, connection } = Object.values(f.bindings)[0] ?? {};
      const trigger = type === 'timerTrigger' ? { schedule, runOnStartup, useMonitor } : { queueName, connection };
      return { name: f.name, kind: type === 'timerTrigger' ? 'timer' : 'storageQueue', trigger };
    });
    const config = loadConfig(settings);
    const specs = functionSpecs(config, createRuntime(config)).map(({ name, kind, trigger }) => ({
      name,
      kind,
      trigger,
    }));
    expect(registered).toEqual(specs);
  });

  it('a wrong setting in the deployed app stops it with the setting named and registers nothing', () => {
    const report = loadLikeWorker(packageDir, { ...settings, MDVM_COPY_MODE: 'teleport' });
    expect(report.ok).toBe(false);
    expect(report.error).toMatch(/ConfigError: .*MDVM_COPY_MODE: expected "server" or "stream"/s);
  });

  it('holds the host files, the build output the entry point needs and production dependencies only', () => {
    expect(zipFiles).toContain('host.json');
    expect(zipFiles).toContain('package.json');
    expect(zipFiles).toContain('dist/src/functions/index.js');
    expect(zipFiles).toContain('node_modules/@azure/functions/package.json');
    // Nested src/ folders inside dependencies survive (an unanchored `src/` pattern drops them).
    expect(zipFiles.some((f) => /^node_modules\/.+\/src\//.test(f))).toBe(true);

    const topLevel = new Set(zipFiles.map((f) => f.split('/')[0]));
    expect([...topLevel].sort()).toEqual(['dist', 'host.json', 'node_modules', 'package.json']);
    const distFolders = new Set(zipFiles.filter((f) => f.startsWith('dist/')).map((f) => f.split('/')[2]));
    expect([...distFolders].sort()).toEqual(['core', 'derive', 'functions']);

    const project = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
    // A dev dependency ships only when a production dependency needs it too (e.g. @types/node under the
    // OpenTelemetry instrumentations); our own tools (vitest, biome, azurite, typescript) never do.
    const production = productionPackages(root);
    for (const dev of Object.keys(project.devDependencies)) {
      const shipped = existsSync(join(packageDir, 'node_modules', dev));
      expect(shipped && !production.has(dev), `dev dependency ${dev} shipped`).toBe(false);
    }
    for (const tool of ['vitest', '@biomejs/biome', 'azurite', 'typescript']) {
      expect(existsSync(join(packageDir, 'node_modules', tool)), `${tool} shipped`).toBe(false);
    }
    for (const dependency of Object.keys(project.dependencies)) {
      expect(existsSync(join(packageDir, 'node_modules', dependency, 'package.json')), dependency).toBe(true);
    }
    const deployed = JSON.parse(readFileSync(join(packageDir, 'package.json'), 'utf8'));
    expect(deployed).toMatchObject({ main: project.main, type: 'module', dependencies: project.dependencies });
    expect(deployed.scripts).toBeUndefined();
    expect(deployed.devDependencies).toBeUndefined();
  });

  it('is the same bytes when built twice from the same inputs', () => {
    const again = tempDir('mdvm-package-again-');
    const second = buildFunctionPackage({ projectDir: root, outDir: again });
    expect(readFileSync(second.zipPath).equals(readFileSync(zipPath))).toBe(true);
  }, 120_000);
});

describe('.funcignore', () => {
  /** A project folder with the real build output and manifest files, and the given .funcignore. */
  function projectWith(funcignore: string): string {
    const dir = tempDir('mdvm-project-');
    for (const file of ['package.json', 'package-lock.json', 'host.json']) cpSync(join(root, file), join(dir, file));
    cpSync(join(root, 'dist'), join(dir, 'dist'), { recursive: true });
    writeFileSync(join(dir, '.funcignore'), funcignore);
    return dir;
  }

  it('the unanchored patterns it used to have drop dist/src, and the package build refuses', () => {
    const unanchored = ['.git*', '.ci/', 'docs/', 'infra/', 'src/', 'test/', 'dist/test/', '*.md', ''].join('\n');
    const project = projectWith(unanchored);
    expect(() => buildFunctionPackage({ projectDir: project })).toThrow(PackageError);
    expect(() => buildFunctionPackage({ projectDir: project })).toThrow(
      /entry point "main": "dist\/src\/functions\/index.js" is not in the package/,
    );
  });

  it('leaves out build output whose source is gone (tsc never deletes it)', () => {
    const project = projectWith(readFileSync(join(root, '.funcignore'), 'utf8'));
    cpSync(join(root, 'src'), join(project, 'src'), { recursive: true });
    writeFileSync(join(project, 'dist', 'src', 'core', 'removedLongAgo.js'), 'export const stale = true;\n');
    mkdirSync(join(project, 'dist', 'src', 'removedFolder'));
    writeFileSync(join(project, 'dist', 'src', 'removedFolder', 'gone.js'), 'export const stale = true;\n');
    const lines: string[] = [];
    const built = buildFunctionPackage({ projectDir: project, log: (line) => lines.push(line) });
    expect(built.files).not.toContain('dist/src/core/removedLongAgo.js');
    expect(built.files).not.toContain('dist/src/removedFolder/gone.js');
    expect(built.files).toContain('dist/src/core/landPart.js');
    expect(lines).toContainEqual(
      expect.stringMatching(/left out \d+ stale build files .*dist\/src\/core\/removedLongAgo\.js/),
    );
  }, 120_000);

  it('keeps everything at the root out unless it is listed, so a stray secret file never ships', () => {
    const project = projectWith(readFileSync(join(root, '.funcignore'), 'utf8'));
    writeFileSync(join(project, '.env'), 'MDVM_LANDING_CONNECTION_STRING=AccountKey=not-a-real-key\n');
    writeFileSync(join(project, 'local.settings.json'), '{}');
    cpSync(join(root, 'src'), join(project, 'src'), { recursive: true });
    const built = buildFunctionPackage({ projectDir: project });
    expect(built.files.filter((f) => !f.startsWith('node_modules/'))).not.toContainEqual(
      expect.stringMatching(/^(\.env|local\.settings\.json|src\/)/),
    );
    expect(built.files).toContain('dist/src/functions/index.js');
  }, 120_000);
});

/** Names of every package in the production dependency tree (what `npm ci --omit=dev` installs). */
function productionPackages(projectRoot: string): Set<string> {
  const listed = spawnSync('npm', ['ls', '--omit=dev', '--all', '--parseable'], { cwd: projectRoot, encoding: 'utf8' });
  const names = new Set<string>();
  for (const line of listed.stdout.split('\n')) {
    const match = /node_modules\/((?:@[^/]+\/)?[^/]+)$/.exec(line.trim());
    if (match?.[1]) names.add(match[1]);
  }
  return names;
}
