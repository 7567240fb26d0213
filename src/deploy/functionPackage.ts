import { spawnSync } from 'node:child_process';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join, posix, relative, sep } from 'node:path';
import { type Zippable, zipSync } from 'fflate';
import ignore, { type Ignore } from 'ignore';

/**
 * Builds the Function App deployment package (docs/adr/0004-deployment-package.md): the project's own files that
 * `.funcignore` lets through, plus the production dependencies installed fresh from package-lock.json, staged
 * in `build/functionapp/` (azure.yaml `dist`, so azd zips exactly this folder) and zipped the way azd zips it
 * into `build/mdvm-ingest-functionapp.zip`.
 */
export interface FunctionPackageOptions {
  /** The project folder (package.json, package-lock.json, host.json, .funcignore, dist/). */
  readonly projectDir: string;
  /** Where the staging folder and the zip go. Default `<projectDir>/build`. */
  readonly outDir?: string;
  /** Progress lines. */
  readonly log?: (line: string) => void;
}

export interface FunctionPackage {
  readonly stagingDir: string;
  readonly zipPath: string;
  /** Paths inside the zip, '/'-separated, sorted. */
  readonly files: readonly string[];
  readonly zipBytes: number;
  readonly unpackedBytes: number;
}

export class PackageError extends Error {
  override readonly name = 'PackageError';
}

export const STAGING_FOLDER = 'functionapp';
export const ZIP_NAME = 'mdvm-ingest-functionapp.zip';

/**
 * What azd leaves out of a function app zip whatever `.funcignore` says (azure-dev pkg/project/project_utils.go):
 * `.azure` folders, `.funcignore` itself and `local.settings.json`, at any depth.
 */
const AZD_ALWAYS_EXCLUDED = ['.azure/', '.funcignore', 'local.settings.json'];

/** Fields of package.json the Functions worker and npm need at run time; scripts and dev tooling stay behind. */
const DEPLOYED_PACKAGE_FIELDS = ['name', 'version', 'description', 'license', 'private', 'type', 'main', 'engines'];

/** Zip entries get this timestamp so the same inputs give the same bytes (1980-01-01 is the zip epoch). */
const FIXED_ENTRY_TIME = new Date(1980, 0, 1, 0, 0, 0);

export function buildFunctionPackage(options: FunctionPackageOptions): FunctionPackage {
  const projectDir = options.projectDir;
  const outDir = options.outDir ?? join(projectDir, 'build');
  const log = options.log ?? (() => {});
  const stagingDir = join(outDir, STAGING_FOLDER);
  const zipPath = join(outDir, ZIP_NAME);

  const packageJson = readJson(join(projectDir, 'package.json'));
  if (!existsSync(join(projectDir, 'package-lock.json'))) {
    throw new PackageError('package-lock.json is missing: the production dependencies are installed from it');
  }

  rmSync(stagingDir, { recursive: true, force: true });
  rmSync(zipPath, { force: true });
  mkdirSync(stagingDir, { recursive: true });

  // 1. The project's own files, as .funcignore selects them. node_modules never comes from the project: it
  //    holds the dev tools (Azurite, vitest, a Node binary); production dependencies are installed below.
  const funcignore = readFuncignore(projectDir);
  const selected = listIncluded(projectDir, (path, isDir) => {
    if (path === 'node_modules' || isOutput(projectDir, outDir, path)) return true;
    return funcignore.ignores(isDir ? `${path}/` : path);
  });
  // tsc never deletes what it emitted for a source that is gone: such files would ship unseen.
  const stale = selected.filter((file) => isStaleBuildOutput(projectDir, file));
  const projectFiles = selected.filter((file) => !stale.includes(file));
  for (const file of projectFiles) copyInto(projectDir, stagingDir, file);
  log(`project files: ${projectFiles.length} (selected by .funcignore)`);
  if (stale.length > 0) {
    log(`left out ${stale.length} stale build files whose source is gone: ${stale.slice(0, 5).join(', ')}`);
  }
  // What the host must find before anything is installed: host.json at the root, the entry point "main" names.
  if (!existsSync(join(stagingDir, 'host.json'))) {
    throw new PackageError('host.json is not in the package: check .funcignore');
  }
  const main = typeof packageJson.main === 'string' ? packageJson.main : '';
  if (!main || !existsSync(join(stagingDir, main))) {
    throw new PackageError(
      `the entry point "main": "${main}" is not in the package: run "npm run build" first, and check that .funcignore lets it through`,
    );
  }

  // 2. Production dependencies, exactly as locked. Scripts stay off: no dependency needs one, and the
  //    project's own "prepare" (tsc) has nothing to build here.
  copyFileSync(join(projectDir, 'package.json'), join(stagingDir, 'package.json'));
  copyFileSync(join(projectDir, 'package-lock.json'), join(stagingDir, 'package-lock.json'));
  npm(stagingDir, [
    'ci',
    '--omit=dev',
    '--ignore-scripts',
    '--no-bin-links',
    '--no-audit',
    '--no-fund',
    '--prefer-offline',
    '--loglevel=error',
  ]);

  // 3. The deployed package.json: what the worker reads ("main", "type") and the dependency list, nothing that
  //    would make a build service run our dev scripts. The lock file described the dev tree too, so it goes.
  const deployed: Record<string, unknown> = {};
  for (const field of DEPLOYED_PACKAGE_FIELDS) {
    if (packageJson[field] !== undefined) deployed[field] = packageJson[field];
  }
  deployed.dependencies = packageJson.dependencies ?? {};
  writeFileSync(join(stagingDir, 'package.json'), `${JSON.stringify(deployed, null, 2)}\n`);
  unlinkSync(join(stagingDir, 'package-lock.json'));

  // 4. The zip azd would make of the staging folder.
  const azdExcluded = ignore().add(AZD_ALWAYS_EXCLUDED);
  const zipFiles = listIncluded(stagingDir, (path, isDir) => azdExcluded.ignores(isDir ? `${path}/` : path));
  const entries: Zippable = {};
  let unpackedBytes = 0;
  for (const file of zipFiles) {
    const data = readFileSync(join(stagingDir, ...file.split('/')));
    unpackedBytes += data.length;
    entries[file] = [data, { mtime: FIXED_ENTRY_TIME, level: 9 }];
  }
  const zip = zipSync(entries);
  writeFileSync(zipPath, zip);
  log(
    `${relative(projectDir, zipPath) || zipPath}: ${zipFiles.length} files, ${mib(zip.length)} MiB (${mib(unpackedBytes)} MiB unpacked)`,
  );
  return { stagingDir, zipPath, files: zipFiles, zipBytes: zip.length, unpackedBytes };
}

function readFuncignore(projectDir: string): Ignore {
  const path = join(projectDir, '.funcignore');
  if (!existsSync(path)) {
    throw new PackageError('.funcignore is missing: without it the package would carry the whole project');
  }
  // azd strips a UTF-8 byte order mark before parsing; so do we.
  return ignore().add(readFileSync(path, 'utf8').replace(/^\uFEFF/, ''));
}

function isOutput(projectDir: string, outDir: string, path: string): boolean {
  return relative(projectDir, outDir).split(sep).join('/') === path;
}

/**
 * Build output of a source file that no longer exists: `dist/src/<path>.js` (or its map or declaration) where `src/`
 * is there but `src/<path>.ts` is not (a whole folder removed too). A project without `src/` (dist/ alone) says nothing.
 */
function isStaleBuildOutput(projectDir: string, file: string): boolean {
  const emitted = /^dist\/(src\/.+?)\.(js|js\.map|d\.ts|d\.ts\.map)$/.exec(file);
  if (!emitted?.[1]) return false;
  return existsSync(join(projectDir, 'src')) && !existsSync(join(projectDir, `${emitted[1]}.ts`));
}

/** Every file below `root` ('/'-separated, sorted) whose path and folders `excluded` lets through. */
function listIncluded(root: string, excluded: (path: string, isDir: boolean) => boolean): string[] {
  const files: string[] = [];
  const visit = (dir: string) => {
    for (const entry of readdirSync(join(root, ...dir.split('/').filter(Boolean)), { withFileTypes: true })) {
      const path = dir ? `${dir}/${entry.name}` : entry.name;
      // Like azd, follow links: what they point at is what gets zipped.
      const isDir = entry.isDirectory() || (entry.isSymbolicLink() && statSync(join(root, path)).isDirectory());
      if (excluded(path, isDir)) continue;
      if (isDir) visit(path);
      else files.push(path);
    }
  };
  visit('');
  return files.sort();
}

function copyInto(fromRoot: string, toRoot: string, file: string): void {
  const target = join(toRoot, ...file.split(posix.sep));
  mkdirSync(dirname(target), { recursive: true });
  copyFileSync(join(fromRoot, ...file.split(posix.sep)), target);
}

function npm(cwd: string, args: string[]): void {
  // npm is a .cmd script on Windows, which only a shell can start; the arguments are fixed flags.
  const windows = process.platform === 'win32';
  const result = spawnSync(windows ? 'npm.cmd' : 'npm', args, { cwd, stdio: 'inherit', shell: windows });
  if (result.error) throw new PackageError(`could not run npm: ${result.error.message}`);
  if (result.status !== 0) throw new PackageError(`npm ${args[0]} failed with exit code ${result.status}`);
}

function readJson(path: string): Record<string, unknown> {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
  } catch (error) {
    throw new PackageError(`cannot read ${path}: ${(error as Error).message}`);
  }
}

function mib(bytes: number): string {
  return (bytes / (1024 * 1024)).toFixed(1);
}
