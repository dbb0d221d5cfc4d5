// Drives headless Chromium (the system one, no browser download) through the gateway:
// open the page, see it render, see Vite's HMR socket connect through the gateway, edit a source
// file, see the page update. Prints one JSON line; exits non-zero on failure. Every wait is bounded.
import { chromium } from "playwright-core";
import { writeFileSync } from "node:fs";

const [url, sourceFile, resolverRules] = process.argv.slice(2);
const args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
if (resolverRules) args.push(`--host-resolver-rules=${resolverRules}`);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args });
const result = { sockets: [] };
const timeout = 20000;
try {
  const page = await browser.newPage();
  // Resolves when Vite's client says {"type":"connected"} on its HMR socket.
  const hmrConnected = new Promise((resolve) => {
    page.on("websocket", (ws) => {
      result.sockets.push(ws.url());
      ws.on("framereceived", (frame) => {
        if (String(frame.payload).includes('"connected"')) resolve(ws.url());
      });
    });
  });
  const response = await page.goto(url, { timeout });
  result.status = response.status();
  await page.waitForFunction(() => document.getElementById("msg")?.textContent === "hello from the sandbox",
    null, { timeout });
  result.rendered = await page.textContent("#msg");
  result.hmr = await Promise.race([hmrConnected,
    new Promise((_, reject) => setTimeout(() => reject(new Error("no HMR connection")), timeout))]);
  writeFileSync(sourceFile, 'export const message = "updated through the gateway";\n');
  await page.waitForFunction(() => document.getElementById("msg").textContent === "updated through the gateway",
    null, { timeout });
  result.updated = await page.textContent("#msg");
  console.log(JSON.stringify(result));
} catch (e) {
  result.error = String(e);
  console.log(JSON.stringify(result));
  process.exitCode = 1;
} finally {
  await browser.close();
}
