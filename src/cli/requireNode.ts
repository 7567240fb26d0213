/**
 * Imported first by the CLI, before anything that loads undici or the Azure SDK: on a Node.js older than the one the
 * project pins (22, as Azure Functions runs), those fail while loading with errors that name neither Node nor the
 * version (`createZstdDecompress … bind`). Say so instead.
 */
const major = Number(process.versions.node.split('.')[0]);
if (major < 22) {
  process.stderr.write(
    `mdvm-ingest: needs Node.js 22 (this is ${process.version}); in the repository, \`npx mdvm-ingest\` runs it with the project's Node\n`,
  );
  process.exit(2);
}

export {};
