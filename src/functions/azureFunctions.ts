// @azure/functions is a CommonJS bundle whose named exports Node's ESM loader cannot detect:
// import the default export once, here, and re-export the values the app uses.
import functions from '@azure/functions';

export const { app, InvocationContext } = functions;
