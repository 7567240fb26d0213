// What the Functions Node worker hands to @azure/functions when the library asks for its core API: the
// registration surface, recording instead of talking gRPC to the host. Registrations after indexing is
// locked are refused, as the worker refuses them.
const STATE = Symbol.for('mdvm.workerEmulation');
globalThis[STATE] ??= { functions: [], hooks: [], locked: false };
const state = globalThis[STATE];

module.exports = {
  version: '3.x-emulated',
  hostVersion: '4.x-emulated',
  setProgrammingModel(model) {
    state.programmingModel = { name: model?.name, version: model?.version };
  },
  getProgrammingModel() {
    return state.programmingModel;
  },
  registerHook(hookName) {
    state.hooks.push(hookName);
    return { dispose() {} };
  },
  log() {},
  registerFunction(metadata, handler) {
    if (state.locked) throw new Error(`A function can only be registered during app startup: ${metadata.name}`);
    if (state.functions.some((f) => f.metadata.name === metadata.name)) {
      throw new Error(`Duplicate function name: ${metadata.name}`);
    }
    state.functions.push({ metadata, handlerType: typeof handler });
    return { dispose() {} };
  },
  Disposable: class {
    dispose() {}
  },
};
