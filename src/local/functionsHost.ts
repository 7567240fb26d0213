import { createRequire } from 'node:module';
import type { InvocationContext as InvocationContextType } from '@azure/functions';
import { InvocationContext } from '../functions/azureFunctions.js';

/**
 * What the app registered with the Functions host, captured the way the real Node worker does it:
 * `@azure/functions` asks for the `@azure/functions-core` module on its first `app.*` call, and the
 * worker supplies it by intercepting `require`. We supply a recorder instead, so the local runner and
 * the tests call exactly the handlers (and see exactly the trigger metadata) the host would.
 */
export interface RegisteredFunction {
  readonly name: string;
  readonly bindings: readonly Record<string, unknown>[];
  readonly trigger: Record<string, unknown>;
  readonly handler: (input: unknown, context: InvocationContextType) => Promise<unknown>;
}

const registry = new Map<string, RegisteredFunction>();
let installed = false;

export function installFunctionsHostCapture(): void {
  if (installed) return;
  installed = true;
  const fakeCore = {
    version: 'mdvm-local',
    hostVersion: 'mdvm-local',
    setProgrammingModel: () => {},
    getProgrammingModel: () => undefined,
    registerHook: () => ({ dispose: () => {} }),
    log: () => {},
    registerFunction: (
      metadata: { name: string; bindings: Record<string, Record<string, unknown>> },
      handler: RegisteredFunction['handler'],
    ) => {
      const bindings = Object.values(metadata.bindings);
      const trigger = bindings.find((b) => String(b.type).endsWith('Trigger')) ?? {};
      registry.set(metadata.name, { name: metadata.name, bindings, trigger, handler });
      return { dispose: () => registry.delete(metadata.name) };
    },
  };
  const require = createRequire(import.meta.url);
  const Module = require('node:module') as { prototype: { require: (id: string) => unknown } };
  Module.prototype.require = new Proxy(Module.prototype.require, {
    apply(target, thisArg, args: [string]) {
      if (args[0] === '@azure/functions-core') return fakeCore;
      return Reflect.apply(target, thisArg, args);
    },
  });
}

/** Everything registered so far (call `registry.clear()` through `resetRegistrations` between apps). */
export function registeredFunctions(): ReadonlyMap<string, RegisteredFunction> {
  return registry;
}

export function resetRegistrations(): void {
  registry.clear();
}

export interface InvokeOptions {
  triggerMetadata?: Record<string, unknown>;
  log?: (level: string, message: string) => void;
}

/** Call a registered handler through a real InvocationContext. */
export async function invoke(fn: RegisteredFunction, input: unknown, options: InvokeOptions = {}): Promise<unknown> {
  const context = new InvocationContext({
    invocationId: crypto.randomUUID(),
    functionName: fn.name,
    ...(options.triggerMetadata ? { triggerMetadata: options.triggerMetadata } : {}),
    logHandler: (level, ...args) => options.log?.(level, args.map(String).join(' ')),
  });
  return fn.handler(input, context);
}
