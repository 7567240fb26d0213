#!/usr/bin/env node
// azd predeploy hook (azure.yaml): on the first `azd up`, the role assignments provisioning just created for the
// app's managed identity take minutes to apply, and until they do the Flex Consumption deployment service,
// which writes the package to the deployment container as that identity, fails with
//   InaccessibleStorageException: Failed to access storage account for deployment: ... 403 (This request is
//   not authorized to perform this operation using this permission.)
// This waits until the identity's newest role assignment is ROLE_PROPAGATION_SECONDS old (default 300), and
// returns at once when it already is, as on every later deployment. It never fails the deployment: if it cannot
// tell (no az, not signed in), it says so and lets azd go on.
import { spawnSync } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';

const PRINCIPAL_VAR = 'AZURE_MANAGED_IDENTITY_PRINCIPAL_ID';
const AZ = process.env.AZ || 'az';
const WAIT_SECONDS = Number(process.env.ROLE_PROPAGATION_SECONDS ?? 300);
const GUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

const say = (line) => console.log(`role propagation: ${line}`);

/** az is a .cmd script on Windows, which only a shell starts; the arguments are fixed words and a GUID. */
function az(args) {
  const windows = process.platform === 'win32';
  const result = spawnSync(windows && !/\.(cmd|exe|bat)$/i.test(AZ) ? `${AZ}.cmd` : AZ, args, {
    encoding: 'utf8',
    shell: windows,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  if (result.error || result.status !== 0) return undefined;
  return result.stdout;
}

async function main() {
  if (!Number.isFinite(WAIT_SECONDS) || WAIT_SECONDS <= 0) return say('ROLE_PROPAGATION_SECONDS is 0: not waiting');
  const principalId = (process.env[PRINCIPAL_VAR] ?? '').trim();
  if (!GUID.test(principalId)) return say(`${PRINCIPAL_VAR} is not set (run azd provision first): not waiting`);

  const listed = az([
    'role',
    'assignment',
    'list',
    '--assignee',
    principalId,
    '--all',
    '--only-show-errors',
    '-o',
    'json',
  ]);
  let assignments;
  try {
    assignments = JSON.parse(listed ?? '');
  } catch {
    return say(
      'could not list the identity\'s role assignments with the Azure CLI (az login?): not waiting. If the deployment fails with "403 ... not authorized to perform this operation", run `azd deploy` again in a few minutes.',
    );
  }
  const created = assignments
    .map((a) => Date.parse(a.createdOn ?? ''))
    .filter((t) => Number.isFinite(t))
    .sort((a, b) => b - a);
  if (created.length === 0) return say('the identity has no role assignments yet: not waiting');

  const newest = created[0];
  const remainingMs = newest + WAIT_SECONDS * 1000 - Date.now();
  if (remainingMs <= 0) return say(`role assignments are older than ${WAIT_SECONDS}s: not waiting`);
  say(
    `the identity's role assignments were created at ${new Date(newest).toISOString()}; waiting ${Math.ceil(remainingMs / 1000)}s for them to take effect before the package is deployed`,
  );
  const until = Date.now() + remainingMs;
  while (Date.now() < until) {
    await sleep(Math.min(30_000, until - Date.now()));
    const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
    if (left > 0) say(`${left}s to go`);
  }
  say('done');
}

await main();
