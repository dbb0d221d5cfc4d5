// Runs headless Chromium (the system one, no browser download) through a list of steps the Python
// test writes as JSON on argv[2], and prints one JSON line with what happened. Every wait is bounded.
//
// Steps: {op: "goto", url, name}            navigate; records status, final URL, X-Gateway-Reason
//        {op: "wait", js, timeout?}          until the expression is truthy in the page
//        {op: "eval", js, name, timeout?}    the expression's value (awaited)
//        {op: "screenshot", path, name}      a PNG of the page; records its size in bytes
//        {op: "signal", name}                prints {"signal": name}, waits for a line on stdin
//        {op: "page"}                        a new page in the same browser context (same cookies)
//        {op: "cookies", name}               the context's cookies
// Everything the page does is recorded too: requests (URL, method), console messages, WebSockets
// (URL, frames sent and received), so the test can check what went through the gateway.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const plan = JSON.parse(process.argv[2]);
const args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
if (plan.resolverRules) args.push(`--host-resolver-rules=${plan.resolverRules}`);
// A test CA's certificate, trusted by its key (base64 SHA-256 of its SubjectPublicKeyInfo).
if (plan.spki) args.push(`--ignore-certificate-errors-spki-list=${plan.spki}`);
const timeout = plan.timeout || 20000;
const out = { steps: {}, requests: [], console: [], sockets: [] };
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args });

function watch(page) {
  page.on("request", (r) => out.requests.push({ url: r.url(), method: r.method() }));
  page.on("console", (m) => out.console.push({ type: m.type(), text: m.text() }));
  page.on("websocket", (ws) => {
    const s = { url: ws.url(), sent: [], received: [], closed: false, error: null };
    out.sockets.push(s);
    ws.on("framesent", (f) => s.sent.push(String(f.payload)));
    ws.on("framereceived", (f) => s.received.push(String(f.payload)));
    ws.on("close", () => { s.closed = true; });
    ws.on("socketerror", (e) => { s.error = String(e); });
  });
  page.setDefaultTimeout(timeout);
  return page;
}

try {
  const context = await browser.newContext(plan.viewport ? { viewport: plan.viewport } : {});
  let page = watch(await context.newPage());
  for (const step of plan.steps) {
    if (step.op === "goto") {
      const r = await page.goto(step.url, { timeout });
      const headers = r ? await r.allHeaders() : {};
      out.steps[step.name] = { status: r ? r.status() : null, url: page.url(), reason: headers["x-gateway-reason"] || null,
        redirectedFrom: r && r.request().redirectedFrom() ? r.request().redirectedFrom().url() : null };
    } else if (step.op === "wait") {
      await page.waitForFunction(step.js, null, { timeout: step.timeout || timeout });
    } else if (step.op === "eval") {  // page.evaluate has no timeout of its own
      const limit = step.timeout || timeout;
      out.steps[step.name] = await Promise.race([page.evaluate(step.js),
        new Promise((_, reject) => setTimeout(() => reject(new Error(`${step.name}: no result in ${limit} ms`)), limit))]);
    } else if (step.op === "screenshot") {
      const png = await page.screenshot({ path: step.path, fullPage: true });
      out.steps[step.name] = png.length;
    } else if (step.op === "signal") {
      console.log(JSON.stringify({ signal: step.name }));
      const next = await Promise.race([lines.next(),
        new Promise((_, reject) => setTimeout(() => reject(new Error(`no answer to ${step.name}`)), timeout))]);
      if (next.done) throw new Error("stdin closed");
    } else if (step.op === "page") {
      page = watch(await context.newPage());
    } else if (step.op === "cookies") {
      out.steps[step.name] = await context.cookies();
    } else {
      throw new Error(`unknown step ${step.op}`);
    }
  }
  console.log(JSON.stringify(out));
} catch (e) {
  out.error = String(e);
  console.log(JSON.stringify(out));
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit();
}
