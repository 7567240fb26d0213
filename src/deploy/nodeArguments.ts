/**
 * The Node.js arguments of every process that copies parts: the Function App's worker (app setting
 * `languageWorkers__node__arguments` in infra/modules/function-app.bicep, which the Functions host puts on the
 * worker's command line), `npm start`, a Core Tools run (local.settings.sample.json), the CLI's `#!` line
 * (src/cli/main.ts), and the bench's child jobs, which import this list. Tests hold the first four to it.
 *
 * `--initial-old-space-size` puts a floor under V8's old-generation limit
 * (docs/adr/0012-a-floor-under-the-old-generation-limit.md). V8 counts the Buffer memory allocated since the last
 * full GC against that limit. A worker's JS heap is small (13 MiB when only the copier is loaded), so after a full GC
 * the limit sits about 8 MiB plus the new space above it. A record-counting stream copy allocates about 12 GiB of
 * gunzip output per GiB it copies, and only the young generation's collections free it. Every ~10 MiB of output then
 * starts a full GC: 150–530 of them per GiB, and 1.5–2.2 times the CPU of the same work without them. With a 96 MiB
 * floor it runs 1–3 full GCs per GiB. The floor allocates nothing: garbage only waits longer for a full GC, and a
 * heap with more live data has a higher limit than this anyway.
 *
 * Not NODE_OPTIONS: Node refuses this V8 flag there.
 */
export const NODE_ARGUMENTS: readonly string[] = ['--initial-old-space-size=96'];
