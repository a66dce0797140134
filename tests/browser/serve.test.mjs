// Real-browser test of blip-serve's page: Debian's chromium driven by
// playwright-core. Usage: node serve.test.mjs BASE_URL EMPTY_URL LIB SHOTDIR
// (two servers started by tests/test_serve_browser.sh). Prints one FAIL line
// per failed check and exits 1 on any failure, or when the browser cannot run.
import fs from "node:fs";
import path from "node:path";
import pw from "playwright-core";

const [base, emptyBase, lib, shots] = process.argv.slice(2);
const CHROMIUM = process.env.BLIP_CHROMIUM || "/usr/bin/chromium";
const XSS = "<img src=x onerror=alert(1)>.jpg";
let passed = 0, failed = 0;
function check(name, cond, detail) {
  if (cond) passed++;
  else { failed++; console.log("FAIL: " + name + (detail === undefined ? "" : " " + JSON.stringify(detail).slice(0, 400))); }
}

let browser;
try {
  browser = await pw.chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
} catch (e) {
  console.log("FAIL: the browser cannot run (" + CHROMIUM + "): " + e.message.split("\n")[0]);
  process.exit(1);
}
const ctx = await browser.newContext({ viewport: { width: 1200, height: 860 } });
const page = await ctx.newPage();
const dialogs = [], errors = [];
page.on("dialog", (d) => { dialogs.push(d.message()); d.dismiss(); });
page.on("pageerror", (e) => errors.push(e.message));
// console errors count, except the resources the test makes fail on purpose (400s)
page.on("console", (m) => { if (m.type() === "error" && !/^Failed to load resource: .* 400/.test(m.text())) errors.push(m.text()); });
page.setDefaultTimeout(30000);

// page.waitForFunction compiles its predicate with eval, which the page's CSP
// (rightly) forbids; poll page.evaluate instead, which runs over CDP
async function waitFor(fn, arg, ms = 30000) {
  const end = Date.now() + ms;
  for (;;) {
    if (await (p2 || page).evaluate(fn, arg)) return;
    if (Date.now() > end) throw new Error("timed out waiting for " + fn.toString().slice(0, 160));
    await new Promise((r) => setTimeout(r, 50));
  }
}
let p2 = null;
const names = async () => page.$$eval("#grid .hit .name", (els) => els.map((e) => e.textContent));
const paths = async () => page.$$eval("#grid .hit .path", (els) => els.map((e) => e.textContent));
async function waitResults() {
  await waitFor(() => !document.body.classList.contains("busy") && document.querySelectorAll("#grid .hit").length > 0);
  await waitFor(() => Array.from(document.querySelectorAll("#grid .hit img")).slice(0, 8)
    .every((i) => i.complete && i.naturalWidth > 0));
}
async function settle() {
  await waitFor(() => !document.body.classList.contains("busy"));
}

try {
  await page.goto(base + "/");
  await waitFor(() => /photos/.test(document.getElementById("status").textContent));
  const status = await page.textContent("#status");
  check("status line: count, model, precision", /46 photos/.test(status) && /blip-tiny/.test(status) && /f32|bf16|int8/.test(status), status);

  // a text query: the grid shows the API's answer in its order
  await page.fill("#q", "a dog running on a beach");
  await page.keyboard.press("Enter");
  await waitResults();
  const api = await (await page.request.get(base + "/api/search?q=" + encodeURIComponent("a dog running on a beach") + "&n=40")).json();
  const shown = await paths();
  check("grid = /api/search order", JSON.stringify(shown) === JSON.stringify(api.results.map((r) => r.path)), [shown.slice(0, 3), api.results.slice(0, 3).map((r) => r.path)]);
  check("first page holds 40", shown.length === 40, shown.length);
  await page.screenshot({ path: path.join(shots, "grid.png") });
  await page.screenshot({ path: path.join(shots, "grid.jpg"), type: "jpeg", quality: 70 }); // README's

  // details on focus
  await page.focus("#grid .hit:nth-child(1) .thumb");
  await waitFor(() => getComputedStyle(document.querySelector("#grid .hit .info")).opacity === "1");
  const op = await page.$eval("#grid .hit:nth-child(1) .info", (e) => getComputedStyle(e).opacity);
  const info = await page.textContent("#grid .hit:nth-child(1) .info");
  check("focus shows score, match, date, path", op === "1" && /score -?\d/.test(info) && /match \d/.test(info) && info.includes(lib), [op, info]);
  const outline = await page.$eval("#grid .hit:nth-child(1) .thumb", (e) => getComputedStyle(e).outlineStyle);
  await page.keyboard.press("Tab");
  await page.keyboard.press("Shift+Tab");
  const outline2 = await page.$eval("#grid .hit:nth-child(1) .thumb", (e) => getComputedStyle(e).outlineStyle);
  check("keyboard focus is visible", outline2 !== "none", [outline, outline2]);

  // load more
  check("load more offered", await page.isVisible("#more"));
  await page.click("#more");
  await waitFor(() => document.querySelectorAll("#grid .hit").length === 46);
  check("load more appends the rest", (await names()).length === 46 && !(await page.isVisible("#more")));

  // lightbox: click, arrows, Esc
  await page.click("#grid .hit:nth-child(2) .thumb");
  await page.waitForSelector("#lightbox:not([hidden])");
  await waitFor(() => { const i = document.getElementById("lb-img"); return i.complete && i.naturalWidth > 0; });
  const all = await names();
  check("lightbox shows the clicked photo", (await page.textContent("#lb-caption strong")) === all[1]);
  check("lightbox focus inside the dialog", await page.evaluate(() => document.getElementById("lightbox").contains(document.activeElement)));
  await page.screenshot({ path: path.join(shots, "lightbox.png") });
  await page.keyboard.press("ArrowRight");
  check("→ next photo", (await page.textContent("#lb-caption strong")) === all[2]);
  await page.keyboard.press("ArrowLeft");
  await page.keyboard.press("ArrowLeft");
  check("← previous photo", (await page.textContent("#lb-caption strong")) === all[0]);
  await page.keyboard.press("Escape");
  check("Esc closes", await page.isHidden("#lightbox"));
  check("focus returns to the photo", await page.evaluate(() => document.activeElement.dataset.index === "0"));

  // more like this: the photo itself comes first (image -> image, cosine 1)
  const target = all[5];
  await page.click("#grid .hit:nth-child(6) .similar");
  await waitFor((t) => !document.body.classList.contains("busy") && document.querySelector("#grid .hit .name") &&
    document.querySelector("#grid .hit .name").textContent === t, target);
  check("more like this: the photo first", (await names())[0] === target, [(await names())[0], target]);

  // date filter (b/ holds the 2023 photos)
  await page.fill("#q", "a photo");
  await page.keyboard.press("Enter");
  await waitResults();
  await page.click("#filters summary");
  await page.fill("#f-after", "2023-01-01");
  await page.dispatchEvent("#f-after", "change");
  await settle();
  await waitFor(() => document.querySelectorAll("#grid .hit").length === 4);
  const dated = await paths();
  check("date filter: only photos from 2023 on", dated.length === 4 && dated.every((p) => p.startsWith(lib + "/b/")), dated);
  await page.fill("#f-before", "2023-01-01");
  await page.dispatchEvent("#f-before", "change");
  await settle();
  const none = await page.textContent("#message");
  check("no match says so", /No indexed photo matches these filters/.test(none) && (await names()).length === 0, none);
  await page.fill("#f-under", "relative/dir");
  await page.dispatchEvent("#f-under", "change");
  await settle();
  const err = await page.textContent("#message");
  check("a server error is shown", /Search failed: under must be an absolute directory/.test(err), err);
  await page.click("#f-clear");
  await settle();

  // upload a photo
  const up = path.join(lib, "a", "img00003.jpg");
  await page.setInputFiles("#file", up);
  await waitFor(() => !document.body.classList.contains("busy") && document.querySelectorAll("#grid .hit").length > 0 &&
    document.querySelector("#grid .hit .name").textContent === "img00003.jpg");
  check("upload: that photo first", (await paths())[0] === up);

  // the XSS file name is text, and nothing runs
  await page.fill("#q", "a photo");
  await page.keyboard.press("Enter");
  await waitResults();
  await page.click("#more");
  await waitFor(() => document.querySelectorAll("#grid .hit").length === 46);
  const xs = await names();
  check("XSS name shown as text", xs.includes(XSS), xs.filter((n) => n.includes("img")));
  let injected = await page.evaluate(() => document.querySelectorAll('img[src="x"], [onerror]').length);
  check("no element injected by the name (grid)", injected === 0, injected);
  const i = xs.indexOf(XSS);
  if (i >= 0) {
    await page.click(`#grid .hit:nth-child(${i + 1}) .thumb`);
    await page.waitForSelector("#lightbox:not([hidden])");
    check("XSS name as text in the lightbox", (await page.textContent("#lb-caption strong")) === XSS);
    await page.screenshot({ path: path.join(shots, "xss.png") });
    await page.keyboard.press("Escape");
  }
  await page.waitForTimeout(300);
  injected = await page.evaluate(() => document.querySelectorAll('img[src="x"], [onerror]').length);
  check("no element injected by the name (lightbox)", injected === 0, injected);
  check("no script ran (no dialog)", dialogs.length === 0, dialogs);

  // empty index
  p2 = await ctx.newPage();
  await p2.goto(emptyBase + "/");
  await waitFor(() => /index is empty/.test(document.getElementById("message").textContent));
  check("empty index explained", /run blip-index/.test(await p2.textContent("#message")));
  await p2.screenshot({ path: path.join(shots, "empty.png") });
  check("no page errors (CSP, script)", errors.length === 0, errors);
} catch (e) {
  check("browser run: " + e.message.split("\n")[0], false);
  await page.screenshot({ path: path.join(shots, "failure.png") }).catch(() => {});
}
await browser.close();
console.log("browser: " + passed + " passed, " + failed + " failed");
process.exit(failed ? 1 : 0);
