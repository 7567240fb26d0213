/**
 * `npm run package`: builds the deployment package azd deploys (azure.yaml `dist`), or that you deploy by hand
 * with `az functionapp deployment source config-zip`. Run after `npm run build`; exit 1 with the reason on failure.
 */
import { fileURLToPath } from 'node:url';
import { buildFunctionPackage, PackageError } from './functionPackage.js';

// dist/src/deploy/main.js → the project folder.
const projectDir = fileURLToPath(new URL('../../../', import.meta.url));
try {
  buildFunctionPackage({ projectDir, log: (line) => console.log(line) });
} catch (error) {
  console.error(`npm run package: ${error instanceof PackageError ? error.message : String(error)}`);
  process.exit(1);
}
