// Real-browser test of blip-serve's page, one scenario for two browsers:
// Debian's chromium (over CDP) and firefox-esr (over WebDriver BiDi), both
// driven by puppeteer-core. Usage:
//   BLIP_TEST_TOKEN=T node serve.test.mjs chromium|firefox BASE_URL EMPTY_URL TOKEN_URL LIB SHOTDIR
// (three servers started by tests/test_serve_browser.sh; TOKEN_URL's wants token T). Prints one FAIL line
// per failed check and exits 1 on any failure, or when the browser cannot run.
import path from "node:path";
import puppeteer from "puppeteer-core";

const [which, base, emptyBase, tokenBase, lib, shots] = process.argv.slice(2);
const BROWSERS = {
  chromium: { browser: "chrome", executablePath: process.env.BLIP_CHROMIUM || "/usr/bin/chromium",
              args: ["--no-sandbox", "--disable-gpu"] },
  firefox: { browser: "firefox", executablePath: process.env.BLIP_FIREFOX || "/usr/bin/firefox-esr" },
};
const XSS = "<img src=x onerror=alert(1)>.jpg";
let passed = 0, failed = 0;
function check(name, cond, detail) {
  if (cond) passed++;
  else { failed++; console.log(`FAIL (${which}): ` + name + (detail === undefined ? "" : " " + JSON.stringify(detail).slice(0, 400))); }
}
if (!BROWSERS[which]) { console.log("FAIL: unknown browser " + which + " (chromium or firefox)"); process.exit(1); }

let browser;
try {
  browser = await puppeteer.launch({ ...BROWSERS[which], headless: true, defaultViewport: { width: 1200, height: 860 },
                                     timeout: 60000 });
} catch (e) {
  console.log(`FAIL (${which}): the browser cannot run (${BROWSERS[which].executablePath}): ` + e.message.split("\n")[0]);
  process.exit(1);
}
console.log(`browser: ${which} ${await browser.version()}`);
let page = await browser.newPage();
const dialogs = [], errors = [];
function watch(p) {
  p.on("dialog", (d) => { dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  p.on("pageerror", (e) => errors.push(String(e.message || e)));
  // console errors count, except the resources the test makes fail on purpose (400s)
  p.on("console", (m) => { if (m.type() === "error" && !/^Failed to load resource: .* 400/.test(m.text())) errors.push(m.text()); });
}
watch(page);
page.setDefaultTimeout(30000);

// helpers over page.evaluate only: its functions run through the protocol,
// while puppeteer's own waitForFunction/waitForSelector may compile code in
// the page, which the page's CSP (rightly) forbids
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function waitFor(fn, arg, ms = 30000) {
  const end = Date.now() + ms;
  for (;;) {
    if (await page.evaluate(fn, arg)) return;
    if (Date.now() > end) throw new Error("timed out waiting for " + fn.toString().slice(0, 160));
    await sleep(50);
  }
}
const text = (sel) => page.evaluate((s) => document.querySelector(s).textContent, sel);
const visible = (sel) => page.evaluate((s) => { const e = document.querySelector(s);
  return !!e && e.getClientRects().length > 0 && getComputedStyle(e).visibility !== "hidden"; }, sel);
// a filter field: set its value as a user's edit ends, with the change event the page listens to
const setField = (sel, v) => page.evaluate((s, val) => { const e = document.querySelector(s);
  e.value = val; e.dispatchEvent(new Event("change", { bubbles: true })); }, sel, v);
async function typeQuery(q) {
  await page.click("#q", { count: 3 });
  await page.keyboard.press("Backspace");
  await page.type("#q", q);
  await page.keyboard.press("Enter");
}
const names = () => page.evaluate(() => Array.from(document.querySelectorAll("#grid .hit .name"), (e) => e.textContent));
const paths = () => page.evaluate(() => Array.from(document.querySelectorAll("#grid .hit .path"), (e) => e.textContent));
async function waitResults() {
  await waitFor(() => !document.body.classList.contains("busy") && document.querySelectorAll("#grid .hit").length > 0);
  await waitFor(() => Array.from(document.querySelectorAll("#grid .hit img")).slice(0, 8)
    .every((i) => i.complete && i.naturalWidth > 0));
}
const settle = () => waitFor(() => !document.body.classList.contains("busy"));
const shot = (name, opt = {}) => page.screenshot({ path: path.join(shots, name), ...opt });

try {
  await page.goto(base + "/");
  await waitFor(() => /photos/.test(document.getElementById("status").textContent));
  const status = await text("#status");
  check("status line: count, model, precision", /46 photos/.test(status) && /blip-tiny/.test(status) && /f32|bf16|int8/.test(status), status);

  // a text query, typed: the grid shows the API's answer in its order
  await typeQuery("a dog running on a beach");
  await waitResults();
  const api = await (await fetch(base + "/api/search?q=" + encodeURIComponent("a dog running on a beach") + "&n=40")).json();
  const shown = await paths();
  check("grid = /api/search order", JSON.stringify(shown) === JSON.stringify(api.results.map((r) => r.path)), [shown.slice(0, 3), api.results.slice(0, 3).map((r) => r.path)]);
  check("first page holds 40", shown.length === 40, shown.length);
  const thumbs = await page.evaluate(() => Array.from(document.querySelectorAll("#grid .hit img"))
    .filter((i) => i.complete && i.naturalWidth > 0).length);
  check("thumbnails decoded", thumbs >= 8, thumbs);
  await shot("grid.png");
  await shot("grid.jpg", { type: "jpeg", quality: 70 }); // README's

  // details on focus
  await page.focus("#grid .hit:nth-child(1) .thumb");
  await waitFor(() => getComputedStyle(document.querySelector("#grid .hit .info")).opacity === "1");
  const op = await page.evaluate(() => getComputedStyle(document.querySelector("#grid .hit:nth-child(1) .info")).opacity);
  const info = await text("#grid .hit:nth-child(1) .info");
  check("focus shows score, match, date, path", op === "1" && /score -?\d/.test(info) && /match \d/.test(info) && info.includes(lib), [op, info]);
  await page.keyboard.press("Tab");
  await page.keyboard.down("Shift");
  await page.keyboard.press("Tab");
  await page.keyboard.up("Shift");
  const focus = await page.evaluate(() => { const e = document.activeElement;
    return [e.dataset.index, getComputedStyle(e).outlineStyle]; });
  check("keyboard focus is visible", focus[0] === "0" && focus[1] !== "none", focus);

  // load more
  check("load more offered", await visible("#more"));
  await page.click("#more");
  await waitFor(() => document.querySelectorAll("#grid .hit").length === 46);
  check("load more appends the rest", (await names()).length === 46 && !(await visible("#more")));

  // lightbox: click, arrows, Esc
  await page.click("#grid .hit:nth-child(2) .thumb");
  await waitFor(() => !document.getElementById("lightbox").hidden);
  await waitFor(() => { const i = document.getElementById("lb-img"); return i.complete && i.naturalWidth > 0; });
  const all = await names();
  check("lightbox shows the clicked photo", (await text("#lb-caption strong")) === all[1]);
  check("lightbox focus inside the dialog", await page.evaluate(() => document.getElementById("lightbox").contains(document.activeElement)));
  await shot("lightbox.png");
  await page.keyboard.press("ArrowRight");
  check("→ next photo", (await text("#lb-caption strong")) === all[2]);
  await page.keyboard.press("ArrowLeft");
  await page.keyboard.press("ArrowLeft");
  check("← previous photo", (await text("#lb-caption strong")) === all[0]);
  await page.keyboard.press("Escape");
  check("Esc closes", !(await visible("#lightbox")));
  check("focus returns to the photo", await page.evaluate(() => document.activeElement.dataset.index === "0"));

  // more like this: the photo itself comes first (image -> image, cosine 1)
  const target = all[5];
  await page.click("#grid .hit:nth-child(6) .similar");
  await waitFor((t) => !document.body.classList.contains("busy") && document.querySelector("#grid .hit .name") &&
    document.querySelector("#grid .hit .name").textContent === t, target);
  check("more like this: the photo first", (await names())[0] === target, [(await names())[0], target]);

  // date filter (b/ holds the 2023 photos)
  await typeQuery("a photo");
  await waitResults();
  await page.click("#filters summary");
  await setField("#f-after", "2023-01-01");
  await settle();
  await waitFor(() => document.querySelectorAll("#grid .hit").length === 4);
  const dated = await paths();
  check("date filter: only photos from 2023 on", dated.length === 4 && dated.every((p) => p.startsWith(lib + "/b/")), dated);
  await setField("#f-before", "2023-01-01");
  await settle();
  const none = await text("#message");
  check("no match says so", /No indexed photo matches these filters/.test(none) && (await names()).length === 0, none);
  await setField("#f-under", "relative/dir");
  await settle();
  const err = await text("#message");
  check("a server error is shown", /Search failed: under must be an absolute directory/.test(err), err);
  await page.click("#f-clear");
  await settle();

  // upload a photo
  const up = path.join(lib, "a", "img00003.jpg");
  await (await page.$("#file")).uploadFile(up);
  await waitFor(() => !document.body.classList.contains("busy") && document.querySelectorAll("#grid .hit").length > 0 &&
    document.querySelector("#grid .hit .name").textContent === "img00003.jpg");
  check("upload: that photo first", (await paths())[0] === up);

  // the XSS file name is text, and nothing runs
  await typeQuery("a photo");
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
    await waitFor(() => !document.getElementById("lightbox").hidden);
    check("XSS name as text in the lightbox", (await text("#lb-caption strong")) === XSS);
    await shot("xss.png");
    await page.keyboard.press("Escape");
  }
  await sleep(300);
  injected = await page.evaluate(() => document.querySelectorAll('img[src="x"], [onerror]').length);
  check("no element injected by the name (lightbox)", injected === 0, injected);
  check("no script ran (no dialog)", dialogs.length === 0, dialogs);

  // empty index
  page = await browser.newPage();
  watch(page);
  await page.goto(emptyBase + "/");
  await waitFor(() => /index is empty/.test(document.getElementById("message").textContent));
  check("empty index explained", /run blip-index/.test(await text("#message")));
  await shot("empty.png");
  check("no page errors (CSP, script)", errors.length === 0, errors);
  errors.length = 0;

  // a server with a token: the page asks for it and trades it for a session cookie no script can read
  page = await browser.newPage();
  watch(page);
  await page.goto(tokenBase + "/");
  await waitFor(() => !document.getElementById("token-form").hidden);
  await page.type("#token", "not-the-token-0123456789");
  await page.keyboard.press("Enter");
  await waitFor(() => /token was refused/.test(document.getElementById("message").textContent));
  check("token: a wrong one is refused", !(await page.evaluate(() => document.getElementById("token-form").hidden)));
  await page.click("#token", { count: 3 });
  await page.type("#token", process.env.BLIP_TEST_TOKEN);
  await page.keyboard.press("Enter");
  await waitFor(() => /46 photos/.test(document.getElementById("status").textContent));
  check("token: accepted, the form goes", await page.evaluate(() => document.getElementById("token-form").hidden));
  const cookie = await page.evaluate(() => document.cookie);
  check("token: the cookie is HttpOnly (no script sees it)", cookie === "", cookie);
  await typeQuery("a photo");
  await waitResults(); // the thumbnails' requests carry the cookie
  check("token: search and thumbnails with the cookie", (await names()).length === 40);
  // the 401s the page met before it had the token are expected
  check("no page errors with a token (CSP, script)", errors.filter((e) => !/\b401\b/.test(e)).length === 0, errors);
} catch (e) {
  check("browser run: " + e.message.split("\n")[0], false);
  await shot("failure.png").catch(() => {});
}
await browser.close();
console.log(`browser ${which}: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
