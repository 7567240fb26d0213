import { app } from './azureFunctions.js';
import type { FunctionSpec } from './specs.js';

/** Hands each function spec to the Functions host, through the public @azure/functions v4 API only. */
export function registerWithHost(specs: readonly FunctionSpec[]): void {
  for (const spec of specs) {
    if (spec.kind === 'timer') app.timer(spec.name, { ...spec.trigger, handler: spec.handler });
    else app.storageQueue(spec.name, { ...spec.trigger, handler: spec.handler });
  }
}
