#!/usr/bin/env node
// Grants the WindowsDefenderATP application roles the app needs to its managed identity, through Microsoft Graph.
// Run by azd as the postprovision hook (azure.yaml, on Linux, macOS and Windows alike), or by hand by a directory
// admin. Node (which the project needs anyway) and the Azure CLI signed in; `--help` explains the rest.
import { spawnSync } from 'node:child_process';
import { basename } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

const DEFENDER_APP_ID = 'fc780465-2017-40d4-a0c5-307022471b92';
const ROLES = ['Vulnerability.Read.All', 'Software.Read.All', 'SecurityBaselinesAssessment.Read.All'];
const PRINCIPAL_VAR = 'AZURE_MANAGED_IDENTITY_PRINCIPAL_ID';
const GUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

const env = process.env;
// AZ / AZD: the commands to run (tests point them at fakes).
const AZ = env.AZ || 'az';
const AZD = env.AZD || 'azd';
const GRAPH = (env.GRAPH_ENDPOINT || 'https://graph.microsoft.com').replace(/\/+$/, '');
// A managed identity created a moment ago can take a while to show up in Graph.
const LOOKUP_ATTEMPTS = Number(env.GRANT_LOOKUP_ATTEMPTS || 6);
const RETRY_DELAY_SECONDS = Number(env.GRANT_RETRY_DELAY_SECONDS || 10);
const script = basename(process.argv[1] ?? 'grant-defender-permissions.mjs');

const USAGE = `Usage: ${script} [--dry-run] [PRINCIPAL_ID]

Grants the WindowsDefenderATP (Microsoft Defender for Endpoint API) application permissions
  ${ROLES.join(' ')}
to the service principal of the Function App's managed identity, as app role assignments made through
Microsoft Graph. Managed identities do not appear in the portal's "API permissions" blade, so this is how
they get application permissions. Roles already granted are skipped, so running it again is safe.

Arguments:
  PRINCIPAL_ID   principal (object) id of the managed identity, not its client id. Default: the
                 environment variable ${PRINCIPAL_VAR} (azd passes its outputs to hooks), then
                 \`azd env get-value ${PRINCIPAL_VAR}\` when azd is installed.

Options:
  --dry-run      look everything up and print what would be granted; grant nothing
  -h, --help     show this help

Requirements:
  - Node.js 18 or later (the project needs 22) and the Azure CLI signed in (\`az login\`) to the tenant of the
    subscription you deployed to. azd's own sign-in (\`azd auth login\`) is separate; the az CLI needs its own.
  - The signed-in account must be able to grant app role assignments: Privileged Role Administrator,
    Cloud Application Administrator, Application Administrator or Global Administrator, or an identity
    with the Graph permission AppRoleAssignment.ReadWrite.All.
  - The tenant must have Microsoft Defender for Endpoint (the WindowsDefenderATP service principal,
    app id ${DEFENDER_APP_ID}).

Environment:
  GRAPH_ENDPOINT              Microsoft Graph endpoint (default https://graph.microsoft.com). GCC High and
                              DoD: https://graph.microsoft.us, after \`az cloud set --name AzureUSGovernment\`
                              and \`az login\`.
  AZ                          Azure CLI command to run (default az).
  GRANT_LOOKUP_ATTEMPTS       lookups of a newly created identity before giving up (default 6).
  GRANT_RETRY_DELAY_SECONDS   wait between those lookups (default 10).`;

class Stop extends Error {}
const die = (message) => {
  throw new Stop(message);
};

/** Anything az or Graph says is shown through this, in case it ever carries a token. */
function scrub(text) {
  return String(text)
    .replace(/([Bb]earer)\s+[A-Za-z0-9._~+/=-]+/g, '$1 <redacted>')
    .replace(/eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*/g, '<redacted>')
    .replace(/("?(access_token|accessToken|refresh_token)"?\s*[:=]\s*"?)[^",\s]+/g, '$1<redacted>')
    .trim();
}

/** Run a CLI (az, azd). On Windows they are .cmd scripts that only a shell starts; the arguments are fixed words. */
function cli(command, args) {
  const windows = process.platform === 'win32';
  const result = spawnSync(windows && !/\.(cmd|exe|bat)$/i.test(command) ? `${command}.cmd` : command, args, {
    encoding: 'utf8',
    shell: windows,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  if (result.error) return { ok: false, missing: result.error.code === 'ENOENT', stdout: '', stderr: '' };
  return { ok: result.status === 0, missing: false, stdout: result.stdout.trim(), stderr: result.stderr };
}

function parseArguments(argv) {
  let dryRun = false;
  let principalId = '';
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') return { help: true };
    if (arg === '--dry-run') dryRun = true;
    else if (arg === '--') {
      const rest = argv.slice(i + 1);
      if (rest.length > 1 || (rest.length === 1 && principalId)) die('more than one principal id given (see --help)');
      if (rest[0]) principalId = rest[0];
      break;
    } else if (arg.startsWith('-')) die(`unknown option '${arg}' (see --help)`);
    else if (principalId) die('more than one principal id given (see --help)');
    else principalId = arg;
  }
  return { help: false, dryRun, principalId };
}

function findPrincipalId(given) {
  if (given) return { id: given, source: 'argument' };
  if (env[PRINCIPAL_VAR]) return { id: env[PRINCIPAL_VAR], source: `environment variable ${PRINCIPAL_VAR}` };
  const azd = cli(AZD, ['env', 'get-value', PRINCIPAL_VAR]);
  if (azd.ok && azd.stdout) return { id: azd.stdout, source: `azd env get-value ${PRINCIPAL_VAR}` };
  return die(`no managed identity principal id. Pass it as the first argument, set ${PRINCIPAL_VAR}, or run this
from the azd project after \`azd provision\` (azd env get-value ${PRINCIPAL_VAR}). It is the identity's
principal (object) id: az identity show -g <resource-group> -n <identity-name> --query principalId -o tsv`);
}

/** The Graph endpoint gets a bearer token: https only, except a loopback address (tests). */
function checkGraphEndpoint() {
  let url;
  try {
    url = new URL(GRAPH);
  } catch {
    die(`GRAPH_ENDPOINT '${GRAPH}' is not a URL`);
  }
  const loopback = ['127.0.0.1', 'localhost', '[::1]'].includes(url.hostname);
  if (url.protocol !== 'https:' && !(url.protocol === 'http:' && loopback)) {
    die(`GRAPH_ENDPOINT must be https (got ${url.protocol}//${url.host}): it is sent a bearer token`);
  }
}

function signIn() {
  const account = cli(AZ, ['account', 'show', '--only-show-errors', '--query', 'tenantId', '-o', 'tsv']);
  if (account.missing) {
    die(
      `the Azure CLI ('${AZ}') is not installed or not on PATH: https://learn.microsoft.com/cli/azure/install-azure-cli`,
    );
  }
  if (!account.ok) {
    die(`not signed in to the Azure CLI. Run \`az login\` (the tenant of your deployment), then run this again.
az said: ${scrub(account.stderr)}`);
  }
  const token = cli(AZ, ['account', 'get-access-token', '--resource', GRAPH, '--query', 'accessToken', '-o', 'tsv']);
  if (!token.ok || !token.stdout) {
    die(`the Azure CLI could not get a Microsoft Graph token for ${GRAPH}. Run \`az login\` (for GCC High/DoD first
\`az cloud set --name AzureUSGovernment\` and set GRAPH_ENDPOINT=https://graph.microsoft.us).
az said: ${scrub(token.stderr)}`);
  }
  return { tenantId: account.stdout, token: token.stdout };
}

function insufficientPrivileges(what, principalId) {
  return die(`Microsoft Graph refused: insufficient privileges (while ${what}).
Granting application permissions (app role assignments) needs a directory role: Privileged Role
Administrator, Cloud Application Administrator, Application Administrator or Global Administrator, or an
identity with the Graph permission AppRoleAssignment.ReadWrite.All. Ask an admin to run:
  node infra/scripts/${script} ${principalId}`);
}

/** One Graph call. Sign-in and privilege failures stop the script; any other failure is returned. */
async function graph(token, principalId, what, method, path, body) {
  let response;
  try {
    response = await fetch(`${GRAPH}${path}`, {
      method,
      headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
      ...(body ? { body: JSON.stringify(body) } : {}),
      signal: AbortSignal.timeout(60_000),
    });
  } catch (error) {
    die(`could not reach Microsoft Graph at ${GRAPH} (while ${what}): ${scrub(error.cause?.message ?? error.message)}`);
  }
  const text = await response.text();
  let json;
  try {
    json = text ? JSON.parse(text) : {};
  } catch {
    json = {};
  }
  const detail = scrub(`${json.error?.code ?? response.status}: ${json.error?.message ?? text.slice(0, 300)}`);
  if (response.status === 401) {
    die(`Microsoft Graph did not accept the Azure CLI's sign-in (while ${what}). Run \`az login\` again.
Graph said: ${detail}`);
  }
  if (response.status === 403) insufficientPrivileges(what, principalId);
  return { ok: response.ok, status: response.status, json, detail };
}

async function main(argv) {
  const options = parseArguments(argv);
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  checkGraphEndpoint();
  const found = findPrincipalId(options.principalId);
  const principalId = found.id.trim().toLowerCase();
  if (!GUID.test(principalId)) {
    die(
      `'${principalId}' (from the ${found.source}) is not a GUID; expected the managed identity's principal (object) id`,
    );
  }

  const { tenantId, token } = signIn();
  const call = (what, method, path, body) => graph(token, principalId, what, method, path, body);
  console.log(`Tenant: ${tenantId}; Graph: ${GRAPH}`);
  if (options.dryRun) console.log('Dry run: nothing will be granted.');

  // WindowsDefenderATP service principal and its app roles.
  const defender = await call(
    'looking up the WindowsDefenderATP service principal',
    'GET',
    `/v1.0/servicePrincipals?$filter=${encodeURIComponent(`appId eq '${DEFENDER_APP_ID}'`)}&$select=id,appId,displayName,appRoles`,
  );
  if (!defender.ok) die(`could not look up the WindowsDefenderATP service principal: ${defender.detail}`);
  const defenderSp = defender.json.value?.[0];
  if (!defenderSp?.id) {
    die(`the WindowsDefenderATP service principal (app id ${DEFENDER_APP_ID}) is not in tenant ${tenantId}.
This tenant does not seem to have Microsoft Defender for Endpoint (or Defender Vulnerability Management):
the API exists in a tenant only once Defender for Endpoint has been set up there. Check that az is signed
in to the right tenant (az account show), and that GRAPH_ENDPOINT matches your cloud.`);
  }
  const roleIds = new Map((defenderSp.appRoles ?? []).map((role) => [role.value, String(role.id).toLowerCase()]));
  for (const role of ROLES) {
    if (!roleIds.has(role)) {
      die(`the WindowsDefenderATP service principal (${defenderSp.id}) has no application permission '${role}'`);
    }
  }

  // The managed identity's service principal.
  let identity;
  for (let attempt = 1; ; attempt++) {
    identity = await call(
      'looking up the managed identity',
      'GET',
      `/v1.0/servicePrincipals/${principalId}?$select=id,displayName`,
    );
    if (identity.ok) break;
    if (identity.status !== 404) die(`could not look up service principal ${principalId}: ${identity.detail}`);
    if (attempt >= LOOKUP_ATTEMPTS) {
      die(`no service principal with object id ${principalId} in tenant ${tenantId} (from the ${found.source}).
Pass the managed identity's principal (object) id, not its client id, and check that az is signed in to the
tenant you deployed to. A just-created identity can take a few minutes to appear: try again shortly.`);
    }
    console.log(
      `Service principal ${principalId} not found yet (attempt ${attempt}/${LOOKUP_ATTEMPTS}); retrying in ${RETRY_DELAY_SECONDS}s...`,
    );
    await sleep(RETRY_DELAY_SECONDS * 1000);
  }
  console.log(`Managed identity: ${identity.json.displayName || '<no display name>'} (${principalId})`);
  console.log(`WindowsDefenderATP: ${defenderSp.id}`);

  // Existing assignments.
  const existing = await call(
    'listing existing app role assignments',
    'GET',
    `/v1.0/servicePrincipals/${principalId}/appRoleAssignments?$select=appRoleId,resourceId&$top=999`,
  );
  if (!existing.ok) die(`could not list the app role assignments of ${principalId}: ${existing.detail}`);
  const granted = new Set(
    (existing.json.value ?? [])
      .filter((a) => a.resourceId === defenderSp.id)
      .map((a) => String(a.appRoleId).toLowerCase()),
  );

  // Grant what is missing.
  let added = 0;
  let present = 0;
  for (const role of ROLES) {
    const appRoleId = roleIds.get(role);
    if (granted.has(appRoleId)) {
      console.log(`  already granted: ${role}`);
      present++;
      continue;
    }
    if (options.dryRun) {
      console.log(`  would grant:     ${role} (appRoleId ${appRoleId})`);
      added++;
      continue;
    }
    const result = await call(`granting ${role}`, 'POST', `/v1.0/servicePrincipals/${principalId}/appRoleAssignments`, {
      principalId,
      resourceId: defenderSp.id,
      appRoleId,
    });
    if (result.ok) {
      console.log(`  granted:         ${role}`);
      added++;
    } else if (/already exists/i.test(result.detail)) {
      console.log(`  already granted: ${role}`);
      present++;
    } else {
      die(`granting ${role} failed: ${result.detail}`);
    }
  }

  if (options.dryRun) {
    console.log(`Dry run: ${added} to grant, ${present} already granted.`);
  } else {
    console.log(`Done: ${added} granted, ${present} already granted.`);
    if (added > 0) {
      console.log(
        'Managed identity tokens are cached for up to 24 hours: until the app gets a new token, the Defender',
      );
      console.log('API may still answer 403 naming one of these permissions. That clears on its own.');
    }
  }
  return 0;
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (error) {
  console.error(`${script}: error: ${error instanceof Stop ? error.message : scrub(error?.stack ?? error)}`);
  process.exitCode = 1;
}
