// Drives Debian's headless chromium through the proxy's status page (tests/tests/suites/
// observability.rs): waits until every backend shows "up", prints UP, takes a screenshot,
// then waits until BACKEND shows "down" (the page refreshes itself; it is never reloaded)
// and prints DOWN, with a second screenshot (NAME-down.png). Usage: node status_page.mjs URL BACKEND SCREENSHOT.png
import { createRequire } from "node:module";
const require = createRequire(process.env.PLAYWRIGHT_CORE + "/");
const { chromium } = require("playwright-core");

const [url, backend, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  // A phone-sized viewport: the page must read there too.
  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("requestfailed", (r) => errors.push("request failed: " + r.url()));
  await page.goto(url);
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll("tr[data-backend]")];
    return rows.length > 0 && rows.every((r) => r.dataset.state === "up");
  }, null, { timeout: 20000 });
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log("UP");
  await page.waitForSelector(`tr[data-backend="${backend}"][data-state="down"]`, { timeout: 30000 });
  await page.screenshot({ path: screenshot.replace(/\.png$/, "") + "-down.png", fullPage: true });
  const events = await page.textContent("#events");
  console.log("DOWN " + JSON.stringify({ events, errors }));
} finally {
  await browser.close();
}
