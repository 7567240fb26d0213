import { readFileSync } from 'node:fs';
import { parseEnv } from 'node:util';

/** A settings file that cannot be read: bad input, exit code 2. */
export class SettingsFileError extends Error {}

/**
 * The CLI reads the app's own settings, by their app-setting names, from the environment and optionally
 * from a file: a Functions `local.settings.json` (its `Values`) or a `.env` file. The environment wins (when it
 * has a value), so a one-off override needs no file edit.
 */
export function settingsFrom(
  file: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
): Record<string, string | undefined> {
  if (!file) return { ...env };
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    throw new SettingsFileError(
      `--settings ${file}: ${(error as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (error as Error).message}`,
    );
  }
  let values: Record<string, string>;
  if (file.endsWith('.json')) {
    let parsed: { Values?: Record<string, unknown> };
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new SettingsFileError(`--settings ${file}: not valid JSON`);
    }
    if (!parsed.Values || typeof parsed.Values !== 'object') {
      throw new SettingsFileError(`--settings ${file}: expected a local.settings.json with a "Values" object`);
    }
    values = Object.fromEntries(Object.entries(parsed.Values).map(([k, v]) => [k, String(v)]));
  } else {
    values = parseEnv(text) as Record<string, string>;
  }
  // The environment wins, but only with a value: an empty variable (`MDVM_LANDING_CONTAINER=`) must not put the
  // file's setting back to its default and quietly point the CLI at other resources.
  const setInEnvironment = Object.entries(env).filter(([, value]) => value !== undefined && value.trim() !== '');
  return { ...values, ...Object.fromEntries(setInEnvironment) };
}
