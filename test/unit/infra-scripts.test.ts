import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

const root = fileURLToPath(new URL('../..', import.meta.url));
const script = join(root, 'infra/scripts/grant-defender-permissions.mjs');

const PRINCIPAL_ID = '11111111-2222-4333-8444-555555555555';
const DEFENDER_SP_ID = 'dddddddd-0000-4000-8000-000000000001';
const OTHER_RESOURCE_ID = 'eeeeeeee-0000-4000-8000-000000000002';
const ROLE_IDS = {
  'Vulnerability.Read.All': '41269fc5-d04d-4bfd-bce7-43a51cea049a',
  'Software.Read.All': '37f71c98-d198-41ae-964d-2c49aab74926',
  'SecurityBaselinesAssessment.Read.All': 'e870c0c1-c1e4-4b53-9fba-6ea1c5eb4cbe',
} as const;
const OTHER_ROLE_ID = 'a833e4c5-0000-4000-8000-00000000beef';
/** What the fake az hands out as the Graph token: shaped like a JWT, so a leak would be caught by its look too. */
const FAKE_TOKEN = 'eyJ0eXAiOiJKV1QifQ.eyJhdWQiOiJncmFwaC10ZXN0In0.c2lnbmF0dXJlLW9mLXRoZS10ZXN0';

/**
 * A stand-in for the Azure CLI: it logs every call (arguments separated by \x1f, one call per line) and answers
 * the two calls the script makes (tenant, Graph token). An unexpected call fails loudly.
 */
const FAKE_AZ = `#!/usr/bin/env bash
set -u
{ printf '%s\\x1f' "$@"; printf '\\n'; } >> "$FAKE_AZ_LOG"
if [ "\${FAKE_LOGGED_IN:-1}" != 1 ]; then
  echo "ERROR: Please run 'az login' to setup account." >&2; exit 1
fi
case "\${1:-} \${2:-}" in
  "account show") echo "tenant-0000" ;;
  "account get-access-token") echo "$FAKE_TOKEN" ;;
  *) echo "fake az: unexpected call: $*" >&2; exit 90 ;;
esac
`;

/** A stand-in for Microsoft Graph on loopback, answering the calls the script makes and recording them. */
interface GraphState {
  defenderPresent: boolean;
  assigned: string[];
  postForbidden: boolean;
  requests: { method: string; url: string; authorization: string; body: unknown }[];
}
const graphState: GraphState = { defenderPresent: true, assigned: [], postForbidden: false, requests: [] };

function fakeGraph(): Server {
  return createServer((req, res) => {
    let raw = '';
    req.on('data', (chunk) => {
      raw += chunk;
    });
    req.on('end', () => {
      const url = decodeURIComponent(req.url ?? '');
      const authorization = req.headers.authorization ?? '';
      graphState.requests.push({ method: req.method ?? '', url, authorization, body: raw ? JSON.parse(raw) : null });
      const send = (status: number, body: unknown) => {
        res.writeHead(status, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify(body));
      };
      const error = (status: number, code: string, message: string) => send(status, { error: { code, message } });
      if (authorization !== `Bearer ${FAKE_TOKEN}`) return error(401, 'InvalidAuthenticationToken', 'no token');
      if (
        req.method === 'GET' &&
        url.startsWith("/v1.0/servicePrincipals?$filter=appId eq 'fc780465-2017-40d4-a0c5-307022471b92'")
      ) {
        if (!graphState.defenderPresent) return send(200, { value: [] });
        const appRoles = [['Machine.Read.All', OTHER_ROLE_ID], ...Object.entries(ROLE_IDS)].map(([value, id]) => ({
          value,
          id,
        }));
        return send(200, { value: [{ id: DEFENDER_SP_ID, appId: 'fc780465-2017-40d4-a0c5-307022471b92', appRoles }] });
      }
      const assignments = `/v1.0/servicePrincipals/${PRINCIPAL_ID}/appRoleAssignments`;
      if (req.method === 'GET' && url.startsWith(`${assignments}?`)) {
        return send(200, {
          value: [
            ...graphState.assigned.map((appRoleId) => ({ appRoleId, resourceId: DEFENDER_SP_ID })),
            // The same role id on another resource is not a grant of ours.
            { appRoleId: ROLE_IDS['Software.Read.All'], resourceId: OTHER_RESOURCE_ID },
          ],
        });
      }
      if (req.method === 'POST' && url === assignments) {
        if (graphState.postForbidden) {
          return error(403, 'Authorization_RequestDenied', 'Insufficient privileges to complete the operation.');
        }
        return send(201, { id: 'new-assignment' });
      }
      if (req.method === 'GET' && url.startsWith(`/v1.0/servicePrincipals/${PRINCIPAL_ID}?`)) {
        return send(200, { id: PRINCIPAL_ID, displayName: 'mdvm-test-identity' });
      }
      if (req.method === 'GET' && url.startsWith('/v1.0/servicePrincipals/')) {
        return error(404, 'Request_ResourceNotFound', 'Resource does not exist.');
      }
      return error(400, 'fake-graph', `unexpected request ${req.method} ${url}`);
    });
  });
}

let dir: string;
let fakeAz: string;
let fakeAzd: string;
let logFile: string;
let server: Server;
let graphEndpoint: string;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'mdvm-grant-'));
  fakeAz = join(dir, 'az');
  fakeAzd = join(dir, 'azd');
  logFile = join(dir, 'az.log');
  writeFileSync(fakeAz, FAKE_AZ);
  chmodSync(fakeAz, 0o755);
  writeFileSync(
    fakeAzd,
    `#!/usr/bin/env bash\n[ "$*" = "env get-value AZURE_MANAGED_IDENTITY_PRINCIPAL_ID" ] && echo "${PRINCIPAL_ID}"\n`,
  );
  chmodSync(fakeAzd, 0o755);
  server = fakeGraph();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  graphEndpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  await new Promise((resolve) => server?.close(resolve));
  rmSync(dir, { recursive: true, force: true });
});

beforeEach(() => {
  Object.assign(graphState, { defenderPresent: true, assigned: [], postForbidden: false, requests: [] });
});

interface Run {
  status: number | null;
  out: string;
  azCalls: string[][];
  graph: GraphState['requests'];
}

/** Runs a hook script as azd does, `node <script>`, asynchronously (so a fake Graph in this process can answer). */
async function runNode(
  path: string,
  args: string[],
  env: Record<string, string | undefined>,
): Promise<{ status: number | null; out: string }> {
  const child = spawn(process.execPath, [path, ...args], { env });
  let out = '';
  const collect = (chunk: Buffer) => {
    out += chunk;
  };
  child.stdout.on('data', collect);
  child.stderr.on('data', collect);
  const status = await new Promise<number | null>((resolve) => child.on('close', resolve));
  return { status, out };
}

async function run(args: string[], env: Record<string, string | undefined> = {}): Promise<Run> {
  writeFileSync(logFile, '');
  const base: Record<string, string | undefined> = { ...process.env };
  delete base.AZURE_MANAGED_IDENTITY_PRINCIPAL_ID;
  const { status, out } = await runNode(script, args, {
    ...base,
    AZ: fakeAz,
    AZD: join(dir, 'no-azd-here'),
    GRAPH_ENDPOINT: graphEndpoint,
    GRANT_RETRY_DELAY_SECONDS: '0',
    GRANT_LOOKUP_ATTEMPTS: '2',
    FAKE_AZ_LOG: logFile,
    FAKE_TOKEN,
    ...env,
  });
  const azCalls = readFileSync(logFile, 'utf8')
    .split('\n')
    .filter((line) => line !== '')
    .map((line) => line.split('\x1f').slice(0, -1));
  expect(out, 'the Graph token must never be printed').not.toContain(FAKE_TOKEN);
  return { status, out, azCalls, graph: [...graphState.requests] };
}

const posts = (graph: Run['graph']) => graph.filter((r) => r.method === 'POST');

describe('infra/scripts/grant-defender-permissions.mjs', () => {
  it('prints help and calls nothing', async () => {
    expect(existsSync(script)).toBe(true);
    const { status, out, azCalls, graph } = await run(['--help']);
    expect(status).toBe(0);
    expect(out).toMatch(/Usage: grant-defender-permissions\.mjs \[--dry-run\] \[PRINCIPAL_ID\]/);
    expect(out).toContain('GRAPH_ENDPOINT');
    expect(azCalls).toEqual([]);
    expect(graph).toEqual([]);
  });

  it('refuses to run without a principal id', async () => {
    const { status, out } = await run([]);
    expect(status).toBe(1);
    expect(out).toMatch(/no managed identity principal id/);
    expect(out).toContain('AZURE_MANAGED_IDENTITY_PRINCIPAL_ID');
  });

  it('refuses a principal id that is not a GUID, and an unknown option', async () => {
    expect((await run(['mdvm-identity'])).out).toMatch(/not a GUID/);
    const unknown = await run(['--force', PRINCIPAL_ID]);
    expect(unknown.status).toBe(1);
    expect(unknown.out).toMatch(/unknown option '--force'/);
  });

  it('grants exactly the missing roles and skips the one already granted', async () => {
    graphState.assigned = [OTHER_ROLE_ID, ROLE_IDS['Vulnerability.Read.All']];
    const { status, out, graph } = await run([], { AZURE_MANAGED_IDENTITY_PRINCIPAL_ID: PRINCIPAL_ID });
    expect(status, out).toBe(0);
    const posted = posts(graph);
    for (const request of posted) {
      expect(request.url).toBe(`/v1.0/servicePrincipals/${PRINCIPAL_ID}/appRoleAssignments`);
    }
    // Software.Read.All is assigned only on another resource: it is still granted here.
    expect(posted.map((r) => r.body)).toEqual([
      { principalId: PRINCIPAL_ID, resourceId: DEFENDER_SP_ID, appRoleId: ROLE_IDS['Software.Read.All'] },
      {
        principalId: PRINCIPAL_ID,
        resourceId: DEFENDER_SP_ID,
        appRoleId: ROLE_IDS['SecurityBaselinesAssessment.Read.All'],
      },
    ]);
    expect(out).toMatch(/already granted: Vulnerability\.Read\.All/);
    expect(out).toMatch(/Done: 2 granted, 1 already granted/);
  });

  it('takes the principal id from azd when the environment has none, and asks az for a token for GRAPH_ENDPOINT', async () => {
    const { status, azCalls, graph } = await run([], { AZD: fakeAzd, GRAPH_ENDPOINT: `${graphEndpoint}/` });
    expect(status).toBe(0);
    expect(posts(graph).map((r) => (r.body as { principalId: string }).principalId)).toEqual([
      PRINCIPAL_ID,
      PRINCIPAL_ID,
      PRINCIPAL_ID,
    ]);
    const tokenCall = azCalls.find((args) => args[1] === 'get-access-token');
    expect(tokenCall?.[tokenCall.indexOf('--resource') + 1]).toBe(graphEndpoint);
    // The token goes to Graph in the Authorization header, on every call.
    expect(graph.every((r) => r.authorization === `Bearer ${FAKE_TOKEN}`)).toBe(true);
  });

  it('--dry-run posts nothing', async () => {
    const { status, out, graph } = await run(['--dry-run', PRINCIPAL_ID]);
    expect(status).toBe(0);
    expect(graph.length).toBeGreaterThan(0);
    expect(posts(graph)).toEqual([]);
    expect(out).toMatch(/would grant: +Vulnerability\.Read\.All/);
    expect(out).toMatch(/Dry run: 3 to grant, 0 already granted/);
  });

  it('is a no-op when every role is already granted', async () => {
    graphState.assigned = Object.values(ROLE_IDS);
    const { status, out, graph } = await run([PRINCIPAL_ID]);
    expect(status).toBe(0);
    expect(posts(graph)).toEqual([]);
    expect(out).toMatch(/Done: 0 granted, 3 already granted/);
  });

  it('explains a tenant without Defender for Endpoint', async () => {
    graphState.defenderPresent = false;
    const { status, out, graph } = await run([PRINCIPAL_ID]);
    expect(status).toBe(1);
    expect(out).toMatch(/WindowsDefenderATP service principal .* is not in tenant/);
    expect(out).toMatch(/Defender for Endpoint/);
    expect(posts(graph)).toEqual([]);
  });

  it('explains a missing az sign-in', async () => {
    const { status, out, graph } = await run([PRINCIPAL_ID], { FAKE_LOGGED_IN: '0' });
    expect(status).toBe(1);
    expect(out).toMatch(/not signed in to the Azure CLI.*az login/);
    expect(graph).toEqual([]);
  });

  it('explains a missing Azure CLI', async () => {
    const { status, out } = await run([PRINCIPAL_ID], { AZ: join(dir, 'no-az-here') });
    expect(status).toBe(1);
    expect(out).toMatch(/Azure CLI .* is not installed or not on PATH/);
  });

  it('names the directory roles when Graph answers 403', async () => {
    graphState.postForbidden = true;
    const { status, out } = await run([PRINCIPAL_ID]);
    expect(status).toBe(1);
    expect(out).toMatch(/insufficient privileges/);
    expect(out).toMatch(/Privileged Role\s+Administrator/);
    expect(out).toMatch(/Cloud Application Administrator/);
    expect(out).toMatch(/AppRoleAssignment\.ReadWrite\.All/);
  });

  it('explains an unknown principal id (e.g. a client id passed instead), after retrying', async () => {
    const other = '99999999-2222-4333-8444-555555555555';
    const { status, out, graph } = await run([other]);
    expect(status).toBe(1);
    expect(out).toMatch(/not found yet \(attempt 1\/2\)/);
    expect(out).toMatch(/no service principal with object id 99999999-/);
    expect(out).toMatch(/not its client id/);
    expect(graph.filter((r) => r.url.startsWith(`/v1.0/servicePrincipals/${other}?`))).toHaveLength(2);
    expect(posts(graph)).toEqual([]);
  });

  it('sends the token to no plain-http Graph endpoint but loopback', async () => {
    const { status, out, azCalls } = await run([PRINCIPAL_ID], { GRAPH_ENDPOINT: 'http://graph.example.com' });
    expect(status).toBe(1);
    expect(out).toMatch(/GRAPH_ENDPOINT must be https/);
    expect(azCalls).toEqual([]);
  });
});

describe('GitHub workflows', () => {
  const repoPath = /(?:^|[\s'"=])\.?\/?((?:infra|\.ci|\.github|src|test|bench|docs)\/[\w./-]*\w)/g;

  it.each(['ci.yml', 'infra.yml'])('%s has jobs and runs only files that exist', (name) => {
    const text = readFileSync(join(root, '.github/workflows', name), 'utf8');
    expect(text).toMatch(/^jobs:$/m);
    expect(text).toMatch(new RegExp(`^name: ${name.replace('.yml', '')}$`, 'm'));

    // Lines of `run:` steps, including folded and literal blocks (the lines indented deeper than `run:`).
    const runLines: string[] = [];
    let blockIndent = -1;
    for (const line of text.split('\n')) {
      const indent = line.length - line.trimStart().length;
      if (blockIndent >= 0 && (line.trim() === '' || indent > blockIndent)) {
        runLines.push(line);
        continue;
      }
      blockIndent = -1;
      const match = /^(\s*)(?:- )?run:\s*(.*)$/.exec(line);
      if (match) {
        runLines.push(match[2] ?? '');
        if (/^[|>]/.test(match[2] ?? '')) blockIndent = match[1]?.length ?? 0;
      }
    }
    expect(runLines.length).toBeGreaterThan(0);

    const referenced = runLines.flatMap((line) => [...line.matchAll(repoPath)].map((m) => m[1] ?? ''));
    expect(referenced.length).toBeGreaterThan(0);
    for (const path of referenced) {
      expect(existsSync(join(root, path)), `${name} runs ${path}, which is not in the repository`).toBe(true);
    }
  });
});

describe('infra/scripts/wait-for-role-propagation.mjs', () => {
  const waitScript = join(root, 'infra/scripts/wait-for-role-propagation.mjs');
  let azDir: string;
  let roleAz: string;

  beforeAll(() => {
    azDir = mkdtempSync(join(tmpdir(), 'mdvm-roles-'));
    roleAz = join(azDir, 'az');
    // Answers `az role assignment list --assignee <id> --all ... -o json` from FAKE_ASSIGNMENTS; fails otherwise.
    writeFileSync(
      roleAz,
      `#!/usr/bin/env bash\n[ "$1 $2 $3 $4 $5 $6" = "role assignment list --assignee ${PRINCIPAL_ID} --all" ] || { echo "az: unexpected $*" >&2; exit 2; }\n[ "\${FAKE_SIGNED_IN:-1}" = 1 ] || { echo "Please run 'az login'" >&2; exit 1; }\nprintf '%s' "$FAKE_ASSIGNMENTS"\n`,
    );
    chmodSync(roleAz, 0o755);
  });
  afterAll(() => rmSync(azDir, { recursive: true, force: true }));

  const wait = (env: Record<string, string>) =>
    runNode(waitScript, [], {
      PATH: process.env.PATH ?? '',
      AZ: roleAz,
      AZURE_MANAGED_IDENTITY_PRINCIPAL_ID: PRINCIPAL_ID,
      ...env,
    });
  const assignmentsCreated = (...agesInSeconds: number[]) =>
    JSON.stringify(agesInSeconds.map((age) => ({ createdOn: new Date(Date.now() - age * 1000).toISOString() })));

  it('does not wait when the newest role assignment is older than the propagation time', async () => {
    const { status, out } = await wait({ FAKE_ASSIGNMENTS: assignmentsCreated(3600, 900) });
    expect(status).toBe(0);
    expect(out).toMatch(/older than 300s: not waiting/);
  });

  it('waits out the rest of the propagation time after a fresh assignment, then lets the deployment go on', async () => {
    const { status, out } = await wait({
      FAKE_ASSIGNMENTS: assignmentsCreated(3600, 1),
      ROLE_PROPAGATION_SECONDS: '2',
    });
    expect(status).toBe(0);
    expect(out).toMatch(/waiting [12]s for them to take effect/);
    expect(out.trim().split('\n').at(-1)).toBe('role propagation: done');
  });

  it('never fails the deployment when it cannot tell: az not signed in, no identity yet, or switched off', async () => {
    const signedOut = await wait({ FAKE_SIGNED_IN: '0', FAKE_ASSIGNMENTS: '[]' });
    expect(signedOut.status).toBe(0);
    expect(signedOut.out).toMatch(/could not list .* run `azd deploy` again in a few minutes/);
    const noIdentity = await wait({ AZURE_MANAGED_IDENTITY_PRINCIPAL_ID: '', FAKE_ASSIGNMENTS: '[]' });
    expect(noIdentity.status).toBe(0);
    expect(noIdentity.out).toMatch(/AZURE_MANAGED_IDENTITY_PRINCIPAL_ID is not set/);
    const off = await wait({ ROLE_PROPAGATION_SECONDS: '0', FAKE_ASSIGNMENTS: assignmentsCreated(1) });
    expect(off.out).toMatch(/not waiting/);
    expect(off.out).not.toMatch(/waiting \d+s/);
  });
});
