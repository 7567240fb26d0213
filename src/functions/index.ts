/**
 * Entry point for the Azure Functions host (package.json "main").
 * Settings are parsed once here: a wrong one stops the app with the setting's name.
 */
import { loadConfig } from '../core/config.js';
import { createRuntime } from '../core/runtime.js';
import { useAzureMonitorWhenConfigured } from './azureMonitor.js';
import { registerWithHost } from './register.js';
import { functionSpecs } from './specs.js';

const config = loadConfig(process.env);
// Before the runtime creates its first span or instrument (docs/adr/0008).
useAzureMonitorWhenConfigured();
registerWithHost(functionSpecs(config, createRuntime(config)));
