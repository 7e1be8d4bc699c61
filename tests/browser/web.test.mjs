// Browser test of the daemon's web client, in headless Chromium. Started by
// crates/opta-cli/tests/browser.rs, which runs the daemon (behind a proxy it can cut), the
// scripted inference server, and does for this script what a browser cannot: `ask(action)`
// prints `@@ {"action":..}` and waits for the Rust side's one-line JSON answer on stdin.
//
// Env: OPTA_BASE (the proxy's http://127.0.0.1:PORT), OPTA_LINK (a one-time sign-in link),
// OPTA_WORKSPACE (a directory the session works in), OPTA_SCREENSHOTS (where PNGs go),
// CHROMIUM (the browser binary, default /usr/bin/chromium).

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { chromium } from "playwright-core";

const base = must("OPTA_BASE");
const link = must("OPTA_LINK");
const workspace = must("OPTA_WORKSPACE");
const shots = must("OPTA_SCREENSHOTS");
fs.mkdirSync(shots, { recursive: true });

function must(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

const answers = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
/** Asks the Rust side to do something (script replies, cut connections, restart the daemon). */
async function ask(action, extra = {}) {
  process.stdout.write(`@@ ${JSON.stringify({ action, ...extra })}\n`);
  const { value, done } = await answers.next();
  if (done) throw new Error(`no answer to ${action}`);
  const answer = JSON.parse(value);
  if (answer.error) throw new Error(`${action}: ${answer.error}`);
  return answer;
}

function step(name) {
  process.stderr.write(`step: ${name}\n`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

/** Page errors (uncaught exceptions) and CSP violations fail the test. */
const problems = [];
function watch(page, name) {
  page.on("pageerror", (e) => problems.push(`${name}: uncaught ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && /Content Security Policy|Refused to/.test(m.text())) {
      problems.push(`${name}: ${m.text()}`);
    }
  });
  return page;
}

const timeout = 15000;

/** Waits until the turn asked with `prompt` is the last one and has streamed a few words. */
async function streaming(page, prompt) {
  await page.waitForFunction(
    (asked) => {
      const turn = document.querySelector(".turn:last-child");
      const user = turn?.querySelector(".msg.user")?.textContent;
      const text = turn?.querySelector(".msg.assistant")?.textContent || "";
      return user === asked && text.length > 20;
    },
    prompt,
    { timeout },
  );
}

try {
  // --- Sign in with the one-time link ---------------------------------------------------------
  step("sign in with the link");
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const tab1 = watch(await context.newPage(), "tab1");
  await tab1.goto(link);
  await tab1.locator("#app").waitFor({ state: "visible", timeout });
  assert.equal(new URL(tab1.url()).hash, "", "the code is removed from the address bar");
  const token = await tab1.evaluate(() => localStorage.getItem("opta.token"));
  assert.ok(token && token.length >= 24, "the token is kept for the origin");
  const headers = await (await fetch(`${base}/`)).headers;
  assert.match(headers.get("content-security-policy"), /script-src 'self'/);
  assert.match(headers.get("content-security-policy"), /connect-src 'self'/);
  assert.equal(headers.get("x-content-type-options"), "nosniff");
  assert.equal(headers.get("referrer-policy"), "no-referrer");

  step("the link works once");
  const stranger = await browser.newContext();
  const reuse = watch(await stranger.newPage(), "reuse");
  await reuse.goto(link);
  await reuse.locator("#signin").waitFor({ state: "visible", timeout });
  assert.match(await reuse.locator("#signin-error").innerText(), /used or expired/);
  await stranger.close();

  // --- Create a session, send a turn, see the answer rendered ----------------------------------
  step("create a session");
  await tab1.click("#new-session");
  await tab1.fill("#new-title", "Parser work");
  await tab1.fill("#new-workspace", workspace);
  await tab1.click("#new-form button[type=submit]");
  await tab1.locator("#session").waitFor({ state: "visible", timeout });
  const sessionId = new URLSearchParams(new URL(tab1.url()).hash.slice(1)).get("s");
  assert.ok(sessionId, "the page opened the new session");
  await tab1.locator(`#sessions button[data-session="${sessionId}"]`).waitFor({ timeout });

  step("send a turn and see markdown");
  await ask("reply", { kind: "markdown" });
  await tab1.fill("#prompt", "Plan the parser work");
  await tab1.press("#prompt", "Enter");
  const answer = tab1.locator(".msg.assistant").last();
  await answer.locator("h2").waitFor({ timeout });
  assert.equal(await answer.locator("h2").innerText(), "Plan");
  assert.equal(await answer.locator("li").count(), 2);
  assert.match(await answer.locator("pre code").innerText(), /fn parse/);
  const thinking = tab1.locator(".turn:last-child details.thinking");
  assert.equal(await thinking.count(), 1, "the reasoning is shown");
  assert.equal(await thinking.getAttribute("open"), null, "collapsed");
  assert.match(await thinking.locator("pre").textContent(), /Weighing a parser plan/);
  assert.equal(await answer.locator("script").count(), 0, "raw HTML from the model is sanitised");
  assert.equal(await answer.locator("a[href^='javascript']").count(), 0, "no script links");
  assert.equal(await answer.locator("a[href='https://example.com/']").getAttribute("rel"), "noopener noreferrer");
  assert.notEqual(await tab1.title(), "owned");
  await tab1.locator(".turn .stats").first().waitFor({ timeout });
  assert.equal(await tab1.inputValue("#prompt"), "", "the composer is cleared");

  // --- The session list stays live -----------------------------------------------------------
  step("the list follows sessions made elsewhere");
  const made = await fetch(`${base}/v3/sessions`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    // A hostile title: markup and terminal/bidi control characters stay visible text.
    body: JSON.stringify({ title: "Made elsewhere <img src=x onerror=\"document.title='owned'\"> \u001b[31m\u202e" }),
  }).then((r) => r.json());
  const listed = tab1.locator(`#sessions button[data-session="${made.sessionId}"]`);
  await listed.waitFor({ timeout });
  assert.equal(await listed.locator("img").count(), 0, "a title is text, not markup");
  const shown = await listed.locator(".title").innerText();
  assert.ok(shown.includes("<img src=x") && shown.includes("\\u{1b}") && shown.includes("\\u{202e}"), shown);
  await fetch(`${base}/v3/sessions/${made.sessionId}`, {
    method: "DELETE",
    headers: { Authorization: `Bearer ${token}` },
  });
  await tab1
    .locator(`#sessions button[data-session="${made.sessionId}"]`)
    .waitFor({ state: "detached", timeout });

  // --- A tool card while the answer streams ----------------------------------------------------
  step("tool card");
  fs.writeFileSync(path.join(workspace, "notes.txt"), "remember the tokenizer\n");
  await ask("reply", { kind: "tool-then-slow" });
  await tab1.fill("#prompt", "Read my notes");
  await tab1.press("#prompt", "Enter");
  const card = tab1.locator(".tool.ok").last();
  await card.waitFor({ timeout });
  assert.equal(await card.locator(".name").innerText(), "read_file");
  assert.equal(await card.locator(".arg").innerText(), "notes.txt");
  await card.locator("summary").click();
  assert.match(await card.locator("pre").last().innerText(), /remember the tokenizer/);
  await tab1.locator("#session-state.running").waitFor({ timeout });
  await tab1.waitForFunction(
    () => (document.querySelector(".turn:last-child .msg.assistant")?.textContent || "").length > 12,
    null,
    { timeout },
  );
  await tab1.screenshot({ path: path.join(shots, "streaming-tool-card.png") });
  await tab1.locator(".turn:last-child .stats").waitFor({ timeout });

  // --- A permission answered in one tab vanishes from the other ---------------------------------
  step("permission in two tabs");
  const tab2 = watch(await context.newPage(), "tab2");
  await tab2.goto(`${base}/#s=${sessionId}`);
  await tab2.locator("#session").waitFor({ state: "visible", timeout });
  await tab2.locator(".tool.ok").first().waitFor({ timeout });
  await ask("reply", { kind: "write" });
  await tab1.selectOption("#mode", "chat");
  await tab1.fill("#prompt", "Write hello.txt");
  await tab1.press("#prompt", "Enter");
  const prompt1 = tab1.locator(".permission");
  const prompt2 = tab2.locator(".permission");
  await prompt1.waitFor({ timeout });
  await prompt2.waitFor({ timeout });
  assert.match(await prompt1.locator(".summary").innerText(), /hello\.txt/);
  assert.match(await prompt2.locator(".diff .add").first().innerText(), /hello from the web/);
  await tab1.screenshot({ path: path.join(shots, "permission-prompt.png") });
  // "Always for this session": this write runs, and the next one is not asked about.
  await prompt2.locator("button[data-decision=always]").click();
  await prompt1.waitFor({ state: "detached", timeout });
  await prompt2.waitFor({ state: "detached", timeout });
  await tab1.locator(".note", { hasText: "allowed by web" }).waitFor({ timeout });
  await tab1.locator(".tool.ok .name", { hasText: "write_file" }).waitFor({ timeout });
  await tab1.locator(".turn:last-child .stats").waitFor({ timeout });
  assert.equal(
    fs.readFileSync(path.join(workspace, "hello.txt"), "utf8"),
    "hello from the web\n",
    "the tool ran",
  );
  await ask("reply", { kind: "write-again" });
  await tab1.fill("#prompt", "Write again.txt");
  await tab1.press("#prompt", "Enter");
  await tab1
    .locator(".turn:last-child", { has: tab1.locator(".msg.user", { hasText: "Write again.txt" }) })
    .locator(".stats")
    .waitFor({ timeout });
  assert.equal(await tab1.locator(".turn:last-child .permission").count(), 0, "not asked again");
  assert.equal(await tab1.locator(".turn:last-child .tool.ok").count(), 1);
  assert.equal(fs.readFileSync(path.join(workspace, "again.txt"), "utf8"), "no question asked\n");

  // --- Connections cut mid-turn: the stream resumes without a lost or doubled word -------------
  step("cut mid-turn");
  const slow = await ask("reply", { kind: "slow" });
  await tab1.fill("#prompt", "Count slowly");
  await tab1.press("#prompt", "Enter");
  await streaming(tab1, "Count slowly");
  // A third tab joins mid-turn: it gets the history, then the running turn from its start.
  const tab3 = watch(await context.newPage(), "tab3");
  await tab3.goto(`${base}/#s=${sessionId}`);
  await streaming(tab3, "Count slowly");
  const cut = await ask("cut");
  assert.ok(cut.cut > 0, "live connections were cut");
  await tab1.locator(".turn:last-child .stats").waitFor({ timeout: 30000 });
  const text1 = (await tab1.locator(".turn:last-child .msg.assistant").innerText()).trim();
  const text2 = (await tab2.locator(".turn:last-child .msg.assistant").innerText()).trim();
  assert.equal(text1, slow.text.trim(), "tab1 has every word once");
  assert.equal(text2, slow.text.trim(), "tab2 has every word once");
  await tab3.locator(".turn:last-child .stats").waitFor({ timeout });
  const text3 = (await tab3.locator(".turn:last-child .msg.assistant").innerText()).trim();
  assert.equal(text3, slow.text.trim(), "the tab that joined mid-turn has every word once");
  assert.equal(await tab3.locator(".msg.user", { hasText: "Count slowly" }).count(), 1);
  await tab3.close();
  assert.equal(await tab1.locator("#banner").isHidden(), true, "the banner is gone once live");

  // --- A daemon restart mid-turn: the turn ends interrupted, the page reconnects by itself -----
  step("restart mid-turn");
  await ask("reply", { kind: "slow" });
  await tab1.fill("#prompt", "Count again");
  await tab1.press("#prompt", "Enter");
  await streaming(tab1, "Count again");
  await ask("restart");
  await tab1.locator(".turn:last-child .note.error", { hasText: "interrupted" }).waitFor({ timeout: 30000 });
  const partial = await tab1.locator(".turn:last-child .msg.assistant").innerText();
  assert.match(partial, /^w0 w1 w2 w3/, "what streamed before the restart stays");
  await tab2.locator(".turn:last-child .note.error", { hasText: "interrupted" }).waitFor({ timeout: 30000 });
  await ask("reply", { kind: "after-restart" });
  await tab1.fill("#prompt", "Still there?");
  await tab1.press("#prompt", "Enter");
  await tab1.locator(".msg.assistant", { hasText: "Back after the restart" }).waitFor({ timeout });
  await tab2.locator(".msg.assistant", { hasText: "Back after the restart" }).waitFor({ timeout });
  await tab1.locator("#banner").waitFor({ state: "hidden", timeout });
  await tab1.screenshot({ path: path.join(shots, "session.png") });

  // --- Esc cancels the running turn ------------------------------------------------------------
  step("Esc cancels");
  await ask("reply", { kind: "slow" });
  await tab1.fill("#prompt", "Count forever");
  await tab1.press("#prompt", "Enter");
  await streaming(tab1, "Count forever");
  await tab1.keyboard.press("Escape");
  await tab1.locator(".turn:last-child .note", { hasText: "cancelled" }).waitFor({ timeout });
  await tab1.locator("#cancel").waitFor({ state: "hidden", timeout });

  // --- A phone ---------------------------------------------------------------------------------
  step("phone width");
  const phone = await browser.newContext({
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
    colorScheme: "dark",
  });
  const phonePage = watch(await phone.newPage(), "phone");
  await phonePage.goto(`${base}/`);
  await phonePage.evaluate((t) => localStorage.setItem("opta.token", t), token);
  await phonePage.goto(`${base}/#s=${sessionId}`);
  await phonePage.reload();
  await phonePage.locator(".msg.assistant", { hasText: "Back after the restart" }).waitFor({ timeout });
  const width = await phonePage.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= 390, `no sideways scrolling on a phone (page is ${width}px wide)`);
  await phonePage.screenshot({ path: path.join(shots, "phone.png") });
  await phonePage.click("#back");
  await phonePage.locator("#sessions").waitFor({ state: "visible", timeout });
  await phonePage.screenshot({ path: path.join(shots, "phone-sessions.png") });
  await phone.close();

  // --- Session list screenshot, then sign-out in one tab signs out the other --------------------
  step("sign out");
  await tab1.goto(`${base}/`);
  await tab1.locator("#sessions button").first().waitFor({ timeout });
  await tab1.screenshot({ path: path.join(shots, "session-list.png") });
  await tab1.click("#sign-out");
  await tab2.locator("#signin").waitFor({ state: "visible", timeout });
  assert.equal(await tab2.evaluate(() => localStorage.getItem("opta.token")), null);

  // --- A wrong token: a clear banner, not a blank page -------------------------------------------
  step("wrong token");
  await tab1.fill("#signin-token", "not-the-token");
  await tab1.press("#signin-token", "Enter");
  await tab1.locator("#banner.bad").waitFor({ timeout });
  assert.match(await tab1.locator("#banner").innerText(), /refused/);
  assert.equal(await tab1.locator("#signin").isVisible(), true);
  await tab1.screenshot({ path: path.join(shots, "wrong-token.png") });

  // --- The daemon's token rotated under an open page: it stops and asks for the new one ------
  step("rotated token");
  const other = await browser.newContext();
  const rotated = watch(await other.newPage(), "rotated");
  await rotated.goto(`${base}/`);
  await rotated.evaluate((t) => localStorage.setItem("opta.token", t), token);
  await rotated.goto(`${base}/#s=${sessionId}`);
  await rotated.reload();
  await rotated.locator(".msg.assistant").first().waitFor({ timeout });
  await ask("rotate-token");
  await rotated.locator("#signin").waitFor({ state: "visible", timeout: 30000 });
  await rotated.locator("#banner.bad").waitFor({ timeout });
  await other.close();

  assert.deepEqual(problems, [], "no page errors or CSP violations");
  process.stdout.write("@@ {\"action\":\"done\"}\n");
} catch (error) {
  process.stderr.write(`browser test failed: ${error.stack || error}\n`);
  process.exitCode = 1;
} finally {
  await browser.close();
  // stdin (the Rust side's answers) would keep node alive.
  process.exit();
}
