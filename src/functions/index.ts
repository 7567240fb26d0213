/**
 * Entry point for the Azure Functions host (package.json "main").
 * Settings are parsed once here: a wrong one stops the app with the setting's name.
 */
import { loadConfig } from '../core/config.js';
import { createRuntime } from '../core/runtime.js';
import { registerFunctions } from './register.js';

const config = loadConfig(process.env);
registerFunctions(config, createRuntime(config));
