import { createRequire, syncBuiltinESMExports } from 'node:module';

/**
 * Counts every HTTP request this process makes, by kind (service, method, operation), where Node sends it: below
 * every SDK, so retries count too. The Defender client uses undici, not node:http, and is counted by its caller.
 */
export class RequestCounter {
  private readonly counts = new Map<string, number>();

  install(): this {
    const require = createRequire(import.meta.url);
    for (const name of ['node:http', 'node:https']) {
      const mod = require(name) as typeof import('node:http');
      const original = mod.request;
      const counts = this.counts;
      mod.request = ((...args: Parameters<typeof original>) => {
        const [first] = args;
        const options = (typeof first === 'string' || first instanceof URL ? new URL(first) : first) as {
          method?: string;
          path?: string | null;
          pathname?: string;
          search?: string;
        };
        const kind = kindOf(
          options.method ?? 'GET',
          options.path ?? `${options.pathname ?? ''}${options.search ?? ''}`,
        );
        counts.set(kind, (counts.get(kind) ?? 0) + 1);
        return original(...args);
      }) as typeof original;
    }
    syncBuiltinESMExports();
    return this;
  }

  /** Start a measurement; the returned function gives the requests made since, by kind. */
  mark(): () => Record<string, number> {
    const before = new Map(this.counts);
    return () => {
      const out: Record<string, number> = {};
      for (const [kind, n] of this.counts) {
        const d = n - (before.get(kind) ?? 0);
        if (d > 0) out[kind] = d;
      }
      return out;
    };
  }
}

function kindOf(method: string, path: string): string {
  const comp = /[?&]comp=([a-z]+)/i.exec(path)?.[1];
  if (/\/messages/.test(path)) return `queue ${method}`;
  if (/\$batch|^\/[^/]+\/(snapshots|parts|benchfloor)[0-9a-f]*/.test(path) || /Tables/.test(path)) {
    return `table ${method}`;
  }
  return `blob ${method}${comp ? ` ${comp}` : ''}`;
}

export function total(byKind: Record<string, number>): number {
  return Object.values(byKind).reduce((a, b) => a + b, 0);
}
