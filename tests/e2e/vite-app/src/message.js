export const message = "hello from the sandbox";
