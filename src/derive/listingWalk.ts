/**
 * Walking a blob listing beside the names expected in it, to stop at the first one missing instead of reading the
 * whole listing. A flat-namespace account lists names in byte order; an account with a hierarchical namespace lists
 * them depth-first (`a/x` before `a-b/x`). Names are compared both ways, and a name counts as missing only when both
 * orders put it before a name already listed, so neither kind of account can make a gap look like one.
 */

/** Byte order of the ASCII names used here (code-unit order is the same). */
export function byName(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Depth-first order: folder by folder. */
export function bySegments(a: string, b: string): number {
  const x = a.split('/');
  const y = b.split('/');
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const c = byName(x[i] ?? '', y[i] ?? '');
    if (c !== 0) return c;
  }
  return x.length - y.length;
}

const before = (a: string, b: string) => byName(a, b) < 0 && bySegments(a, b) < 0;

/**
 * Every listed item by name, or `gap` once the listing has passed an expected name that is not in it, or
 * `unordered` when the listing follows neither order (then only a full listing can tell).
 */
export async function listedUnlessGap<T extends { readonly name: string }>(
  expectedNames: readonly string[],
  pages: AsyncIterable<readonly T[]>,
): Promise<Map<string, T> | 'gap' | 'unordered'> {
  const expected = [...expectedNames].sort(byName);
  const found = new Map<string, T>();
  let next = 0;
  let previous: string | undefined;
  for await (const page of pages) {
    for (const item of page) {
      if (previous !== undefined && before(item.name, previous)) return 'unordered';
      previous = item.name;
      found.set(item.name, item);
      while (next < expected.length && found.has(expected[next] ?? '')) next++;
      const wanted = expected[next];
      if (wanted !== undefined && before(wanted, item.name)) return 'gap';
    }
    if (next >= expected.length) return found;
  }
  return next >= expected.length ? found : 'gap';
}
