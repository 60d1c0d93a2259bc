// Browser tests of the rollouts page (docs/ota.md "Rollouts"): Debian's chromium driven by
// playwright-core, against a real `mooring serve` that crates/mooring/tests/dashboard.rs
// (`rollouts_in_a_real_browser`) started with three devices that stay offline and one rollout of
// them with a control cohort. Run through that Rust test (`cargo test -p mooring --test dashboard
// rollouts`), which passes everything in the environment:
//   MOORING_URL, MOORING_TOKEN (admin API token), ADMIN_EMAIL, VIEWER_EMAIL, PASSWORD,
//   ROLLOUT_ID (the running rollout), CHROMIUM (the browser binary),
//   SCREENSHOTS (optional: a directory for page screenshots).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run this through crates/mooring/tests/dashboard.rs`);
  return v;
};
const BASE = env("MOORING_URL");
const TOKEN = env("MOORING_TOKEN");
const PASSWORD = env("PASSWORD");
const ADMIN = env("ADMIN_EMAIL");
const VIEWER = env("VIEWER_EMAIL");
const ROLLOUT = env("ROLLOUT_ID");
const WAIT_MS = 20_000;

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: env("CHROMIUM"),
    // CI runs as root, where chromium's sandbox cannot start.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
});
after(async () => {
  await browser?.close();
});

/// The API as the admin token sees it (to check what the browser did, from outside).
async function api(path) {
  const r = await fetch(`${BASE}${path}`, { headers: { authorization: `Bearer ${TOKEN}` } });
  const text = await r.text();
  assert.equal(r.status, 200, `${path}: ${r.status} ${text}`);
  return JSON.parse(text);
}

async function newPage(viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.errors = errors;
  return page;
}

async function login(page, email) {
  await page.goto(`${BASE}/`);
  await page.getByTestId("login-email").waitFor();
  await page.getByTestId("login-email").fill(email);
  await page.getByTestId("login-password").fill(PASSWORD);
  await page.getByTestId("login-submit").click();
  await page.getByTestId("user-menu").filter({ hasText: email }).waitFor();
}

/// A write through the API as the admin token (a change the page did not make).
async function post(path, body) {
  const r = await fetch(`${BASE}${path}`, {
    method: "POST",
    headers: { authorization: `Bearer ${TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const text = await r.text();
  assert.equal(r.status, 200, `${path}: ${r.status} ${text}`);
  return JSON.parse(text);
}

const detail = (page, state) => page.locator(`[data-testid="rollout"][data-rollout-id="${ROLLOUT}"]${state ? `[data-state="${state}"]` : ""}`);

/// The list has the rollout; its link opens the detail, which shows every wave as the API
/// counts it (the control cohort last, labeled so) and the deferred devices.
async function openAndCheckWaves(page) {
  await page.getByTestId("nav-rollouts").click();
  const row = page.locator(`[data-testid="rollout-row"][data-rollout-id="${ROLLOUT}"]`);
  await row.waitFor();
  const r = await api(`/api/v1/rollouts/${ROLLOUT}`);
  assert.match(await row.innerText(), /\b2\.0\.0\b/);
  assert.match(await row.innerText(), /id:d1,d2,d3/);
  assert.equal((await row.getByTestId("rollout-row-committed").innerText()).trim(), `0/${r.total}`);
  await row.getByTestId("rollout-link").click();
  assert.match(page.url(), new RegExp(`#/rollouts/${ROLLOUT}$`));
  await detail(page).waitFor();
  const waves = page.getByTestId("rollout-wave");
  await waves.nth(r.waves.length - 1).waitFor();
  assert.equal(await waves.count(), r.waves.length);
  for (const [i, w] of r.waves.entries()) {
    const row = waves.nth(i);
    assert.equal(await row.getAttribute("data-total"), String(w.total));
    assert.equal(await row.getAttribute("data-control"), String(w.control));
  }
  const control = waves.last();
  assert.equal(await control.getAttribute("data-control"), "true");
  assert.equal((await control.getByTestId("rollout-wave-label").innerText()).trim(), "control");
  // Offline devices are deferred, never failed: the page counts them as the API does.
  assert.ok(r.deferred > 0, JSON.stringify(r));
  await page.locator(`[data-testid="rollout-deferred"][data-deferred="${r.deferred}"]`).waitFor();
  await page.locator('[data-testid="rollout-wave"][data-deferred]:not([data-deferred="0"])').getByTestId("rollout-wave-deferred").first().waitFor();
  // The event log starts with its creation.
  await page.locator('[data-testid="rollout-event"][data-kind="created"]').waitFor();
  return r;
}

test("rollouts: a viewer sees the list, the waves with the control cohort and the deferred devices, and no action", async () => {
  const page = await newPage();
  await login(page, VIEWER);
  await openAndCheckWaves(page);
  for (const id of ["rollout-pause", "rollout-resume", "rollout-abort"]) {
    assert.equal(await page.getByTestId(id).count(), 0, `${id} shown to a viewer`);
  }
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("rollouts: an admin pauses, resumes and aborts from the page; the API and the event log agree", async () => {
  const page = await newPage();
  const streams = [];
  page.on("request", (req) => {
    if (req.url().endsWith(`/api/v1/rollouts/${ROLLOUT}/stream`)) streams.push(req.url());
  });
  await login(page, ADMIN);
  await openAndCheckWaves(page);
  assert.equal((await api(`/api/v1/rollouts/${ROLLOUT}`)).state, "running");
  // Running: only pause and abort.
  await page.locator('[data-testid="rollout-pause"]:not([disabled])').waitFor();
  assert.equal(await page.getByTestId("rollout-resume").isDisabled(), true);
  assert.equal(await page.getByTestId("rollout-abort").isDisabled(), false);

  await page.getByTestId("rollout-pause").click();
  await detail(page, "paused").waitFor();
  assert.equal((await api(`/api/v1/rollouts/${ROLLOUT}`)).state, "paused");
  await page.locator('[data-testid="rollout-event"][data-kind="paused"]').filter({ hasText: ADMIN }).waitFor();
  assert.equal(await page.getByTestId("rollout-pause").isDisabled(), true);

  await page.locator('[data-testid="rollout-resume"]:not([disabled])').click();
  await detail(page, "running").waitFor();
  assert.equal((await api(`/api/v1/rollouts/${ROLLOUT}`)).state, "running");
  await page.locator('[data-testid="rollout-event"][data-kind="resumed"]').waitFor();

  // A change made elsewhere shows without a reload: the page follows the rollout's event stream.
  assert.ok(streams.length > 0, "the page opened no event stream");
  await post(`/api/v1/rollouts/${ROLLOUT}/pause`, { reason: "support call spike" });
  await detail(page, "paused").waitFor();
  await page.getByTestId("rollout-reason").filter({ hasText: "support call spike" }).waitFor();
  await page.locator('[data-testid="rollout-event"][data-kind="paused"]').filter({ hasText: "support call spike" }).waitFor();
  await page.locator('[data-testid="rollout-resume"]:not([disabled])').click();
  await detail(page, "running").waitFor();

  // Abort asks first; canceling the dialog changes nothing.
  await page.getByTestId("rollout-abort").click();
  const dialog = page.getByTestId("rollout-abort-dialog");
  await dialog.waitFor();
  assert.match(await dialog.innerText(), /roll back the devices that committed/i);
  await dialog.getByTestId("rollout-abort-cancel").click();
  await dialog.waitFor({ state: "detached" });
  assert.equal((await api(`/api/v1/rollouts/${ROLLOUT}`)).state, "running");
  await page.getByTestId("rollout-abort").click();
  await dialog.getByTestId("rollout-abort-reason").fill("browser test");
  await dialog.getByTestId("rollout-abort-confirm").click();
  await detail(page, "aborted").waitFor();
  const aborted = await api(`/api/v1/rollouts/${ROLLOUT}`);
  assert.equal(aborted.state, "aborted");
  const events = await api(`/api/v1/rollouts/${ROLLOUT}/events`);
  const ev = events.events.find((e) => e.kind === "aborted");
  assert.ok(ev && ev.by.includes(ADMIN), JSON.stringify(events));
  const row = page.locator('[data-testid="rollout-event"][data-kind="aborted"]');
  await row.waitFor();
  assert.match(await row.getByTestId("rollout-event-by").innerText(), new RegExp(ADMIN.replace(/[.]/g, "\\.")));
  // Over: every action disabled; the list says so too.
  for (const id of ["rollout-pause", "rollout-resume", "rollout-abort"]) {
    assert.equal(await page.getByTestId(id).isDisabled(), true, `${id} enabled after the abort`);
  }
  await page.getByRole("link", { name: "← Rollouts" }).click();
  await page.locator(`[data-testid="rollout-row"][data-rollout-id="${ROLLOUT}"][data-state="aborted"]`).waitFor();
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("screenshots", { skip: !process.env.SCREENSHOTS }, async () => {
  const dir = process.env.SCREENSHOTS;
  const pages = [
    ["rollouts", "#/rollouts", "rollout-row"],
    ["rollout", `#/rollouts/${ROLLOUT}`, "rollout-event"],
  ];
  const sizes = [
    ["desktop", { width: 1280, height: 800 }],
    ["phone", { width: 390, height: 844 }],
  ];
  for (const scheme of ["light", "dark"]) {
    for (const [size, viewport] of sizes) {
      const page = await newPage(viewport);
      await page.emulateMedia({ colorScheme: scheme });
      await login(page, ADMIN);
      for (const [name, hash, ready] of pages) {
        await page.goto(`${BASE}/${hash}`);
        await page.getByTestId(ready).first().waitFor();
        await page.screenshot({ path: `${dir}/${name}-${size}-${scheme}.png`, fullPage: size === "desktop" });
      }
      await page.context().close();
    }
  }
});
