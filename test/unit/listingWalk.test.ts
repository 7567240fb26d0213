import { describe, expect, it } from 'vitest';
import { byName, bySegments, listedUnlessGap } from '../../src/derive/listingWalk.js';

/** A listing served in pages of `size`, counting how many names were handed out. */
function served(names: readonly string[], size: number) {
  let handed = 0;
  const pages = (async function* () {
    for (let i = 0; i < names.length; i += size) {
      const page = names.slice(i, i + size).map((name) => ({ name }));
      handed += page.length;
      yield page;
    }
  })();
  return { pages, handed: () => handed };
}

// Sibling folders where byte order and depth-first order disagree: '-' sorts before '/'.
const names = ['s/a-b/p1', 's/a-b/p2', 's/a/p1', 's/a/p2', 's/b/p1', 's/b/p2', 's/c/p1'];
const flat = [...names].sort(byName);
const depthFirst = [...names].sort(bySegments);

describe('walking a listing beside the expected names', () => {
  it('the two orders really differ on these names', () => {
    expect(flat).not.toEqual(depthFirst);
    expect(depthFirst.slice(0, 2)).toEqual(['s/a/p1', 's/a/p2']);
  });

  it.each([
    ['byte order (flat namespace)', flat],
    ['depth-first order (hierarchical namespace)', depthFirst],
  ])('in %s: finds every name when all are there, with strays between them', async (_, order) => {
    const listing = served([...order, 's/b/p1.tmp'].sort(order === flat ? byName : bySegments), 2);
    const found = await listedUnlessGap(names, listing.pages);
    expect(found).toBeInstanceOf(Map);
    expect([...(found as Map<string, unknown>).keys()].filter((n) => names.includes(n)).sort()).toEqual(
      [...names].sort(),
    );
  });

  it.each([
    ['byte order (flat namespace)', flat],
    ['depth-first order (hierarchical namespace)', depthFirst],
  ])('in %s: stops soon after a missing name, and never calls a present one missing', async (_, order) => {
    for (const missing of names) {
      const listing = served(
        order.filter((n) => n !== missing),
        1,
      );
      expect(await listedUnlessGap(names, listing.pages)).toBe('gap');
    }
    // Missing near the start: the walk stops well before the end.
    const early = served(
      order.filter((n) => n !== order[1]),
      1,
    );
    expect(await listedUnlessGap(names, early.pages)).toBe('gap');
    expect(early.handed()).toBeLessThan(names.length - 1);
  });

  it('a listing seen going backwards in both orders is reported, so the caller reads it whole', async () => {
    const listing = served(['s/a/p1', 's/a/x', 's/a/0', 's/b/p1'], 1);
    expect(await listedUnlessGap(['s/a/p1', 's/b/p1'], listing.pages)).toBe('unordered');
  });
});
