// Browser tests of the dashboard: Debian's chromium driven by playwright-core, against a real
// `mooring serve` that crates/mooring/tests/dashboard.rs started and filled (1,000 devices, a
// live `mooring-agent`, an admin and a viewer). Run through that Rust test (`cargo test -p
// mooring --test dashboard`), which passes everything in the environment:
//   MOORING_URL, MOORING_TOKEN (admin API token), ADMIN_EMAIL, VIEWER_EMAIL, INSTALLER_EMAIL, PASSWORD,
//   LIVE_DEVICE (the agent's device id), LIVE_TAG (a tag only it carries: key=value),
//   BULK_SELECTOR + BULK_COUNT (a tag selector and how many devices it matches),
//   TICKET_ID (an open ticket a playbook opened for the live device),
//   CHROMIUM (the browser binary), SCREENSHOTS (optional: a directory for page screenshots).
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
const INSTALLER = env("INSTALLER_EMAIL");
const LIVE = env("LIVE_DEVICE");
const LIVE_TAG = env("LIVE_TAG");
const BULK_SELECTOR = env("BULK_SELECTOR");
const BULK_COUNT = Number(env("BULK_COUNT"));
const TICKET = env("TICKET_ID");
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
  // Not signed in: the app sends us to the login page.
  await page.getByTestId("login-email").waitFor();
  await page.getByTestId("login-email").fill(email);
  await page.getByTestId("login-password").fill(PASSWORD);
  await page.getByTestId("login-submit").click();
  await page.getByTestId("user-menu").filter({ hasText: email }).waitFor();
}

const byId = (page, id) => page.locator(`[data-testid="device-row"][data-device-id="${id}"]`);

async function filterDevices(page, selector) {
  await page.getByTestId("nav-devices").click();
  const input = page.getByTestId("device-filter");
  await input.fill(selector);
  await input.press("Enter");
}

/// Digits of an element's text, thousands separators dropped ("1,000 devices" -> 1000).
async function countIn(locator) {
  const text = await locator.innerText();
  const m = text.replace(/[,.\u202f\u00a0 ](?=\d{3})/g, "").match(/\d+/);
  return m ? Number(m[0]) : NaN;
}

async function waitCount(locator, n) {
  const deadline = Date.now() + WAIT_MS;
  let last;
  while (Date.now() < deadline) {
    last = await countIn(locator);
    if (last === n) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`expected ${n}, last saw ${last} in "${await locator.innerText()}"`);
}

test("a bad password is refused with a message, the right one signs in", async () => {
  const page = await newPage();
  await page.goto(`${BASE}/`);
  await page.getByTestId("login-email").fill(ADMIN);
  await page.getByTestId("login-password").fill("not-the-password");
  await page.getByTestId("login-submit").click();
  await page.getByTestId("login-error").waitFor();
  assert.notEqual((await page.getByTestId("login-error").innerText()).trim(), "");
  await page.getByTestId("login-password").fill(PASSWORD);
  await page.getByTestId("login-submit").click();
  await page.getByTestId("user-menu").filter({ hasText: ADMIN }).waitFor();
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("find a device among 1,000 by tag, watch its chart update live, send a command, edit the shadow", async () => {
  const page = await newPage();
  await login(page, ADMIN);

  // Every device first, then narrowed to the one tag only the live device carries.
  await page.getByTestId("nav-devices").click();
  await waitCount(page.getByTestId("device-count"), 1000);
  await filterDevices(page, `tag:${LIVE_TAG}`);
  await waitCount(page.getByTestId("device-count"), 1);
  await byId(page, LIVE).waitFor();
  assert.equal(await page.getByTestId("device-row").count(), 1);
  assert.match(page.url(), /selector=/, "the filter is in the URL");

  // Open it: its chart shows points and the newest one moves on as the agent publishes.
  await byId(page, LIVE).getByRole("link").first().click();
  await page.getByTestId("device-title").filter({ hasText: LIVE }).waitFor();
  // The firmware its agent reports running (shadow `reported.version`, on the device record).
  await page.getByTestId("device-version").filter({ hasText: "1.4.2" }).waitFor();
  const chart = page.getByTestId("telemetry-chart");
  await page.waitForFunction(
    () => Number(document.querySelector('[data-testid="telemetry-chart"]')?.dataset.points) > 0,
  );
  const first = Number(await chart.getAttribute("data-last-ts"));
  await page.waitForFunction(
    (t) => Number(document.querySelector('[data-testid="telemetry-chart"]')?.dataset.lastTs) > t,
    first,
  );

  // Send a command the agent handles; its row reaches "succeeded" without a reload.
  await page.getByTestId("command-name").fill("blink");
  await page.getByTestId("command-params").fill('{"times": 2}');
  await page.getByTestId("command-send").click();
  await page.locator('[data-testid="command-row"][data-state="succeeded"]').first().waitFor();
  const cmds = await api(`/api/v1/devices/${LIVE}/commands`);
  assert.ok(
    cmds.commands.some((c) => c.name === "blink" && c.state === "succeeded"),
    JSON.stringify(cmds),
  );

  // Edit the desired shadow; the page shows it and the server stored it.
  await page.getByTestId("shadow-edit").click();
  await page.getByTestId("shadow-desired-editor").fill('{"led": "green"}');
  await page.getByTestId("shadow-save").click();
  await page.getByTestId("shadow-desired").filter({ hasText: "green" }).waitFor();
  const shadow = await api(`/api/v1/devices/${LIVE}/shadow`);
  assert.equal(shadow.desired.led, "green", JSON.stringify(shadow));

  // Bad JSON in the editor: a clear error, nothing stored.
  await page.getByTestId("shadow-edit").click();
  await page.getByTestId("shadow-desired-editor").fill("{not json");
  await page.getByTestId("shadow-save").click();
  await page.getByTestId("shadow-error").waitFor();
  assert.equal((await api(`/api/v1/devices/${LIVE}/shadow`)).desired.led, "green");

  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("bulk tag a selection: the confirmation names the count, the job reports progress to the end", async () => {
  const page = await newPage();
  await login(page, ADMIN);
  await filterDevices(page, BULK_SELECTOR);
  await waitCount(page.getByTestId("device-count"), BULK_COUNT);
  await page.getByTestId("select-all-matching").click();
  await waitCount(page.getByTestId("selection-count"), BULK_COUNT);
  await page.getByTestId("bulk-tag").click();
  await page.getByTestId("bulk-tag-key").fill("batch");
  await page.getByTestId("bulk-tag-value").fill("b1");
  // The dialog that takes the tag is the confirmation: it names the count it applies to.
  const confirm = page.getByTestId("confirm-dialog");
  assert.match(await confirm.innerText(), new RegExp(`\\b${BULK_COUNT}\\b`));
  await page.getByTestId("confirm-ok").click();
  const progress = page.locator('[data-testid="job-progress"][data-state="succeeded"]');
  await progress.waitFor();
  assert.equal(Number(await progress.getAttribute("data-done")), BULK_COUNT);
  assert.equal(Number(await progress.getAttribute("data-total")), BULK_COUNT);
  const summary = await api(`/api/v1/fleet/summary?selector=${encodeURIComponent("tag:batch=b1")}`);
  assert.equal(summary.devices, BULK_COUNT, JSON.stringify(summary));

  // A hand selection of two rows: the confirmation says 2.
  await filterDevices(page, BULK_SELECTOR);
  await page.getByTestId("device-select").nth(0).check();
  await page.getByTestId("device-select").nth(1).check();
  await waitCount(page.getByTestId("selection-count"), 2);
  await page.getByTestId("bulk-tag").click();
  await page.getByTestId("bulk-tag-key").fill("picked");
  await page.getByTestId("bulk-tag-value").fill("yes");
  assert.match(await confirm.innerText(), /\b2\b/);
  await page.getByTestId("confirm-ok").click();
  await page.locator('[data-testid="job-progress"][data-state="succeeded"][data-done="2"]').waitFor();
  assert.equal((await api("/api/v1/fleet/summary?selector=tag:picked=yes")).devices, 2);

  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("a viewer sees no write action, and a forced write is refused", async () => {
  const page = await newPage();
  await login(page, VIEWER);
  for (const id of ["nav-users", "nav-tokens", "nav-audit"]) {
    assert.equal(await page.getByTestId(id).count(), 0, `${id} shown to a viewer`);
  }
  await filterDevices(page, `tag:${LIVE_TAG}`);
  await byId(page, LIVE).waitFor();
  for (const id of ["bulk-tag", "bulk-untag", "bulk-command", "bulk-delete", "device-select"]) {
    assert.equal(await page.getByTestId(id).count(), 0, `${id} shown to a viewer`);
  }
  await byId(page, LIVE).getByRole("link").first().click();
  await page.getByTestId("device-title").filter({ hasText: LIVE }).waitFor();
  // Wait until the page has loaded what it shows (the shadow and command history).
  await page.getByTestId("shadow-reported").waitFor();
  for (const id of ["command-send", "shadow-edit", "shadow-save", "device-delete", "tag-edit", "command-cancel"]) {
    assert.equal(await page.getByTestId(id).count(), 0, `${id} shown to a viewer`);
  }
  // The viewer crafts the request the hidden button would have sent, CSRF token and all.
  const status = await page.evaluate(async (id) => {
    const csrf = document.cookie.split("; ").find((c) => c.startsWith("mooring_csrf="))?.split("=")[1];
    const r = await fetch(`/api/v1/devices/${id}/commands`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-csrf-token": csrf ?? "" },
      body: JSON.stringify({ name: "blink", params: {} }),
    });
    return r.status;
  }, LIVE);
  assert.equal(status, 403);
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("an installer follows a device's pipeline and confirms its installation once it reports", async () => {
  const page = await newPage();
  await login(page, INSTALLER);
  // A unit that never connected: its pipeline stops at registration; a confirmation is refused.
  await page.goto(`${BASE}/#/devices/dev-0001`);
  await page.getByTestId("device-title").filter({ hasText: "dev-0001" }).waitFor();
  const first = page.locator('[data-testid="step-first_connect"][data-state="pending"]');
  await first.waitFor();
  assert.equal(await page.locator('[data-testid="step-registered"]').getAttribute("data-state"), "done");
  assert.equal(await page.locator('[data-testid="step-claimed"]').getAttribute("data-state"), "skipped");
  await page.getByTestId("install-location").fill("Depot, bay 4");
  await page.getByTestId("install-submit").click();
  await page.getByTestId("install-error").filter({ hasText: "never connected" }).waitFor();
  assert.equal((await api("/api/v1/devices/dev-0001")).installation, undefined);
  // An installer may only read and confirm installations.
  for (const id of ["command-send", "shadow-edit", "device-delete", "tag-edit"]) {
    assert.equal(await page.getByTestId(id).count(), 0, `${id} shown to an installer`);
  }
  // The live unit: connected and reporting, so the pipeline is done and the confirmation holds.
  await page.goto(`${BASE}/#/devices/${LIVE}`);
  await page.getByTestId("device-title").filter({ hasText: LIVE }).waitFor();
  await page.locator('[data-testid="step-first_telemetry"][data-state="done"]').waitFor();
  await page.getByTestId("install-location").fill("Depot, bay 7");
  await page.getByTestId("install-notes").fill("charger on the left");
  await page.getByTestId("install-submit").click();
  await page.getByTestId("installation").filter({ hasText: "Depot, bay 7" }).waitFor();
  const device = await api(`/api/v1/devices/${LIVE}`);
  assert.equal(device.installation.location, "Depot, bay 7");
  assert.equal(device.installation.by, INSTALLER);
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("provisioning: the funnel, a claim created with its token shown once, then revoked; a registered CA disabled; a fleet CA rollover begun", async () => {
  const page = await newPage();
  await login(page, ADMIN);
  await page.getByTestId("nav-provisioning").click();
  // The funnel counts what the API counts.
  const funnel = await api("/api/v1/provisioning/funnel");
  for (const stage of funnel.stages) {
    await page.locator(`[data-testid="funnel-${stage.step}"][data-count="${stage.devices}"]`).waitFor();
  }
  assert.equal(funnel.stages[0].devices, 1000);
  // No certificate of this fleet expires soon (ten-year validity).
  await page.getByTestId("expiring").getByText("No active certificate expires").waitFor();
  // A claim for two devices: the token is shown once.
  await page.getByTestId("claim-create").click();
  await page.getByTestId("claim-name").fill("batch 7");
  await page.getByTestId("claim-count").fill("2");
  await page.getByTestId("claim-tags").fill("site=oslo, batch=7");
  await page.getByTestId("claim-submit").click();
  const token = (await page.getByTestId("claim-token").innerText()).trim();
  assert.match(token, /^mct_/);
  await page.getByTestId("claim-dialog").getByRole("button", { name: "Done" }).click();
  const row = page.locator('[data-testid="claim-row"]').filter({ hasText: "batch 7" });
  await row.waitFor();
  assert.equal((await row.getByTestId("claim-uses").innerText()).replace(/\s/g, ""), "0/2");
  const id = await row.getAttribute("data-claim-id");
  const claim = await api(`/api/v1/claims/${id}`);
  assert.deepEqual(claim.tags, { site: "oslo", batch: "7" });
  assert.equal(claim.uses_max, 2);
  // The token works (a bad CSR is the only complaint), until the claim is revoked.
  const enroll = async () => {
    const r = await fetch(`${BASE}/api/v1/provision/enroll`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ claim_token: token, csr_pem: "not a csr", device_id: "sn-1" }),
    });
    return (await r.json()).error.code;
  };
  assert.equal(await enroll(), "invalid_csr");
  await row.getByTestId("claim-revoke").click();
  await page.getByRole("dialog").getByRole("button", { name: "Revoke" }).click();
  await page.locator(`[data-testid="claim-row"][data-claim-id="${id}"][data-state="revoked"]`).waitFor();
  assert.equal(await enroll(), "claim_invalid");
  // The registered manufacturer CA: disabled from the page, and the API agrees.
  const caRow = page.locator('[data-testid="ca-row"]').filter({ hasText: "Acme" });
  await caRow.waitFor();
  assert.equal(await caRow.getAttribute("data-enabled"), "true");
  await caRow.getByTestId("ca-toggle").click();
  await page.locator('[data-testid="ca-row"][data-enabled="false"]').filter({ hasText: "Acme" }).waitFor();
  const cas = await api("/api/v1/cas");
  assert.equal(cas.cas.find((c) => c.subject.includes("Acme")).enabled, false);
  // The fleet CA: one, until a rollover begun from the page shows both (the API agrees).
  const fleet = page.getByTestId("fleet-ca-state");
  await page.locator('[data-testid="fleet-ca-state"][data-rolling-over="false"]').waitFor();
  await page.getByTestId("fleet-ca-rollover").click();
  await page.getByRole("dialog").getByRole("button", { name: "Roll over" }).click();
  await page.locator('[data-testid="fleet-ca-state"][data-rolling-over="true"]').waitFor();
  const rollover = await api("/api/v1/cas/fleet");
  assert.equal(rollover.rolling_over, true);
  assert.match(await fleet.innerText(), /Previous \(still trusted\)/);
  assert.equal(
    (await page.getByTestId("fleet-ca-left").innerText()).split(/\s/)[0].replace(/,/g, ""),
    String(rollover.previous_certificates),
  );
  assert.equal(await page.getByTestId("fleet-ca-retire").isDisabled(), rollover.previous_certificates > 0);
  assert.deepEqual(page.errors, []);
  await page.context().close();
  // A viewer sees the page but cannot create or revoke claims.
  const viewer = await newPage();
  await login(viewer, VIEWER);
  await viewer.getByTestId("nav-provisioning").click();
  await viewer.locator(`[data-testid="claim-row"][data-claim-id="${id}"]`).waitFor();
  assert.equal(await viewer.getByTestId("claim-create").count(), 0);
  assert.equal(await viewer.getByTestId("claim-revoke").count(), 0);
  assert.equal(await viewer.getByTestId("cas").count(), 0, "registered CAs shown to a viewer");
  assert.equal(await viewer.getByTestId("fleet-ca").count(), 0, "the fleet CA shown to a viewer");
  assert.deepEqual(viewer.errors, []);
  await viewer.context().close();
});

// Screenshots of every page, desktop and phone width, light and dark (docs/screenshots/).
test("updates: an artifact deployed to a device from the page, followed there and on the device page, then canceled and deleted", async () => {
  const { createHash } = await import("node:crypto");
  const send = async (method, path, body, raw) => {
    const r = await fetch(`${BASE}${path}`, {
      method,
      headers: { authorization: `Bearer ${TOKEN}`, "content-type": raw ? "application/octet-stream" : "application/json" },
      body: raw ?? JSON.stringify(body),
    });
    const text = await r.text();
    assert.ok(r.ok, `${method} ${path}: ${r.status} ${text}`);
    return text ? JSON.parse(text) : null;
  };
  // An artifact, uploaded the way `mooring ota upload` does (the server signs its manifest).
  const image = Buffer.alloc(200_000, 7);
  const sha256 = createHash("sha256").update(image).digest("hex");
  const created = await send("POST", "/api/v1/ota/artifacts", { version: "9.9.0", compatible: ["rev-b"], notes: "browser test", sha256, size: image.length });
  await send("PUT", `/api/v1/ota/artifacts/${created.id}/content?offset=0`, null, image);
  await send("POST", `/api/v1/ota/artifacts/${created.id}/complete`, {});

  const page = await newPage();
  await login(page, ADMIN);
  await page.getByTestId("nav-ota").click();
  await page.locator(`[data-testid="artifact-row"][data-artifact-id="${created.id}"][data-state="ready"]`).waitFor();
  await page.getByTestId("deploy-open").click();
  const dialog = page.getByTestId("deploy-dialog");
  await dialog.getByTestId("deploy-artifact").selectOption(created.id);
  // The live agent has no updater: it refuses the update command, and the page shows its update
  // failed with the reason; the offline device's stays pending (so the deployment can be canceled).
  await dialog.getByTestId("deploy-selector").fill(`id:${LIVE},dev-0003`);
  await dialog.getByTestId("deploy-submit").click();
  const row = page.locator('[data-testid="deployment-row"]').filter({ hasText: "9.9.0" });
  await row.waitFor();
  const id = await row.getAttribute("data-deployment-id");
  const dep = await api(`/api/v1/ota/deployments/${id}`);
  assert.equal(dep.total, 2);
  assert.equal(dep.artifact_id, created.id);
  // The devices' updates as the page counts them (it follows a deployment in flight), then the
  // live device's on its page.
  await row.locator('[data-testid="deploy-count"][data-state="failed"]').waitFor();
  await row.locator('[data-testid="deploy-count"][data-state="pending"]').waitFor();
  await page.goto(`${BASE}/#/devices/${encodeURIComponent(LIVE)}`);
  const history = page.getByTestId("device-ota");
  await history.locator('[data-testid="ota-row"]').filter({ hasText: "9.9.0" }).filter({ hasText: "command_failed" }).waitFor();
  const updates = await api(`/api/v1/devices/${encodeURIComponent(LIVE)}/ota`);
  assert.equal(updates.updates[0].deployment_id, id);
  assert.equal(updates.updates[0].state, "failed");
  // Its health card counts the refused update command among its command failures, as the API.
  const health = await api(`/api/v1/devices/${encodeURIComponent(LIVE)}/health`);
  assert.ok(health.totals.command_failures >= 1, JSON.stringify(health));
  assert.ok(health.totals.connects >= 1, JSON.stringify(health));
  await page.getByTestId("device-health")
    .locator(`[data-testid="health-count"][data-signal="command_failures"][data-total="${health.totals.command_failures}"]`)
    .waitFor();
  // Canceled from the page: the API agrees.
  await page.getByTestId("nav-ota").click();
  await row.getByTestId("deployment-cancel").click();
  await page.getByRole("dialog").getByRole("button", { name: "Cancel deployment" }).click();
  await page.locator(`[data-testid="deployment-row"][data-deployment-id="${id}"][data-canceled="true"]`).waitFor();
  assert.ok((await api(`/api/v1/ota/deployments/${id}`)).canceled_at);
  assert.deepEqual(page.errors, []);
  await page.context().close();
  // A viewer sees both lists but no deploy, cancel or delete.
  const viewer = await newPage();
  await login(viewer, VIEWER);
  await viewer.getByTestId("nav-ota").click();
  await viewer.locator(`[data-testid="deployment-row"][data-deployment-id="${id}"]`).waitFor();
  assert.equal(await viewer.getByTestId("deploy-open").count(), 0);
  assert.equal(await viewer.getByTestId("deployment-cancel").count(), 0);
  assert.equal(await viewer.getByTestId("deployment-delete").count(), 0);
  assert.equal(await viewer.getByTestId("artifact-delete").count(), 0);
  assert.deepEqual(viewer.errors, []);
  await viewer.context().close();
  // Canceled, it is over: deleted from the page, the API no longer has it.
  const admin = await newPage();
  await login(admin, ADMIN);
  await admin.getByTestId("nav-ota").click();
  const over = admin.locator(`[data-testid="deployment-row"][data-deployment-id="${id}"]`);
  await over.getByTestId("deployment-delete").click();
  await admin.getByRole("dialog").getByRole("button", { name: "Delete deployment" }).click();
  await over.waitFor({ state: "detached" });
  const gone = await fetch(`${BASE}/api/v1/ota/deployments/${id}`, { headers: { authorization: `Bearer ${TOKEN}` } });
  assert.equal(gone.status, 404);
  assert.deepEqual(admin.errors, []);
  await admin.context().close();
});

test("alerts: a rule refused with the column of its error, then created from the page; its alert followed, acknowledged; a viewer sees no actions; deleting the rule resolves it", async () => {
  const page = await newPage();
  await login(page, ADMIN);
  await page.getByTestId("nav-alerts").click();
  await page.getByTestId("rule-create").click();
  const dialog = page.getByTestId("rule-dialog");
  await dialog.getByTestId("rule-name").fill("live-memory");
  await dialog.getByTestId("rule-when").fill("mem.used_bytes >> 0");
  await dialog.getByTestId("rule-selector").fill(`id:${LIVE}`);
  await dialog.getByTestId("rule-then").fill("alert:critical");
  await dialog.getByTestId("rule-submit").click();
  await dialog.getByTestId("rule-error").filter({ hasText: "column" }).waitFor();
  // Fixed: any memory reading of the live agent (it reports every second) fires it.
  await dialog.getByTestId("rule-when").fill("mem.used_bytes > 0");
  await dialog.getByTestId("rule-submit").click();
  const row = page.locator('[data-testid="rule-row"][data-name="live-memory"][data-status="active"]');
  await row.waitFor();
  const ruleId = await row.getAttribute("data-rule-id");
  const alert = page.locator(`[data-testid="alert-row"][data-device-id="${LIVE}"][data-state="firing"]`);
  await alert.waitFor();
  const alertId = await alert.getAttribute("data-alert-id");
  const fired = await api(`/api/v1/alerts/${alertId}`);
  assert.equal(fired.rule_id, ruleId);
  assert.equal(fired.severity, "critical");
  await alert.getByTestId("alert-ack").click();
  await page.locator(`[data-testid="alert-row"][data-alert-id="${alertId}"][data-state="acknowledged"]`).waitFor();
  assert.equal((await api(`/api/v1/alerts/${alertId}`)).state, "acknowledged");
  assert.deepEqual(page.errors, []);
  // A viewer sees the alert and the rule, and no action.
  const viewer = await newPage();
  await login(viewer, VIEWER);
  await viewer.getByTestId("nav-alerts").click();
  await viewer.locator(`[data-testid="alert-row"][data-alert-id="${alertId}"]`).waitFor();
  await viewer.locator(`[data-testid="rule-row"][data-rule-id="${ruleId}"]`).waitFor();
  assert.equal(await viewer.getByTestId("rule-create").count(), 0);
  assert.equal(await viewer.getByTestId("rule-delete").count(), 0);
  assert.equal(await viewer.getByTestId("alert-resolve").count(), 0);
  assert.deepEqual(viewer.errors, []);
  await viewer.context().close();
  // Deleted from the page: its open alert is resolved.
  await row.getByTestId("rule-delete").click();
  await page.getByRole("dialog").getByRole("button", { name: "Delete" }).click();
  await page.locator(`[data-testid="rule-row"][data-rule-id="${ruleId}"]`).waitFor({ state: "detached" });
  const gone = await api(`/api/v1/alerts/${alertId}`);
  assert.equal(gone.state, "resolved");
  assert.equal(gone.resolved_by, "rule_deleted");
  await page.context().close();
});

test("jobs: a telemetry report queued from the page runs as a job and downloads as CSV; the dead letter filter; a viewer sees no cancel", async () => {
  const page = await newPage();
  await login(page, ADMIN);
  await page.getByTestId("nav-jobs").click();
  await page.getByTestId("report-create").click();
  const dialog = page.getByTestId("report-dialog");
  await dialog.getByTestId("report-selector").fill("tag:");
  await dialog.getByTestId("report-submit").click();
  await dialog.getByTestId("report-error").filter({ hasText: "term 1" }).waitFor();
  // The live agent reports every second: its last hour has points.
  await dialog.getByTestId("report-selector").fill(`tag:${LIVE_TAG}`);
  await dialog.getByTestId("report-range").selectOption("3600000");
  await dialog.getByTestId("report-submit").click();
  const row = page.locator('[data-testid="job-row"][data-action="report"][data-state="succeeded"]');
  await row.waitFor();
  const id = await row.getAttribute("data-job-id");
  const job = await api(`/api/v1/jobs/${id}`);
  assert.equal(job.selector, `tag:${LIVE_TAG}`);
  assert.ok(job.result.points > 0, JSON.stringify(job));
  // The link downloads with the session's cookie, as the browser would.
  const link = row.getByTestId("job-download");
  assert.equal(await link.getAttribute("href"), `/api/v1/jobs/${id}/result`);
  const csv = await page.evaluate(async (href) => (await fetch(href)).text(), `/api/v1/jobs/${id}/result`);
  const lines = csv.trim().split("\n");
  assert.equal(lines[0], "device_id,ts_ms,time,metric,value");
  assert.equal(lines.length - 1, job.result.points);
  assert.ok(lines.slice(1).every((l) => l.startsWith(`${LIVE},`)), lines[1]);
  // A fleet report of every device, grouped by site, as an HTML page.
  await page.getByTestId("report-create").click();
  await dialog.getByTestId("report-kind").selectOption("fleet");
  await dialog.getByTestId("report-group-by").fill("tag:site");
  await dialog.getByTestId("report-submit").click();
  const fleetRow = page.locator(`[data-testid="job-row"][data-action="report"][data-state="succeeded"]:not([data-job-id="${id}"])`).first();
  await fleetRow.waitFor();
  const fleetId = await fleetRow.getAttribute("data-job-id");
  const fleetJob = await api(`/api/v1/jobs/${fleetId}`);
  assert.equal(fleetJob.result.format, "html");
  assert.equal(fleetJob.params.report.group_by, "tag:site");
  const page2 = await page.evaluate(async (href) => (await fetch(href)).text(), `/api/v1/jobs/${fleetId}/result`);
  assert.ok(page2.includes("<h2>Health per cohort</h2>") && page2.includes("site=s3"), page2.slice(0, 300));
  // Nothing is dead.
  await page.getByTestId("job-state").selectOption("dead");
  await page.getByText("No jobs in this state.").waitFor();
  assert.deepEqual(page.errors, []);
  await page.context().close();
  // A viewer may export (it reads telemetry) but cancels nothing.
  const viewer = await newPage();
  await login(viewer, VIEWER);
  await viewer.getByTestId("nav-jobs").click();
  await viewer.locator(`[data-testid="job-row"][data-job-id="${id}"]`).waitFor();
  assert.equal(await viewer.getByTestId("job-cancel").count(), 0);
  assert.equal(await viewer.getByTestId("report-create").count(), 1);
  assert.deepEqual(viewer.errors, []);
  await viewer.context().close();
});

test("tickets: a playbook's ticket listed and opened with its device and site; a viewer sees no close; closed from the page", async () => {
  const ticket = await api(`/api/v1/tickets/${TICKET}`);
  assert.equal(ticket.state, "open", JSON.stringify(ticket));
  // A viewer sees the open ticket and its devices, and no way to close it.
  const viewer = await newPage();
  await login(viewer, VIEWER);
  await viewer.getByTestId("nav-tickets").click();
  const viewerRow = viewer.locator(`[data-testid="ticket-row"][data-ticket-id="${TICKET}"][data-state="open"]`);
  await viewerRow.waitFor();
  await viewerRow.getByTestId("ticket-link").click();
  await viewer.locator(`[data-testid="ticket-device-row"][data-device-id="${LIVE}"]`).waitFor();
  assert.equal(await viewer.getByTestId("ticket-close").count(), 0, "ticket-close shown to a viewer");
  assert.deepEqual(viewer.errors, []);
  await viewer.context().close();

  const page = await newPage();
  await login(page, ADMIN);
  await page.getByTestId("nav-tickets").click();
  const row = page.locator(`[data-testid="ticket-row"][data-ticket-id="${TICKET}"]`);
  await row.waitFor();
  assert.match(await row.innerText(), new RegExp(`visit-cart on ${LIVE}`));
  assert.match(await row.innerText(), /\bvisit\b/);
  await row.getByTestId("ticket-link").click();
  await page.getByTestId("ticket-title").filter({ hasText: `visit-cart on ${LIVE}` }).waitFor();
  assert.match(page.url(), new RegExp(`#/tickets/${TICKET}$`));
  // The device to visit, its site and a link to its page.
  const device = page.locator(`[data-testid="ticket-device-row"][data-device-id="${LIVE}"]`);
  await device.waitFor();
  assert.match(await device.innerText(), /\bdepot\b/);
  assert.equal(await device.getByRole("link").getAttribute("href"), `#/devices/${LIVE}`);
  assert.match(await page.getByTestId("ticket-steps").innerText(), /tagged 1 device\(s\) visit=due/);
  // Closed from the page: the page and the API agree.
  await page.getByTestId("ticket-close").click();
  await page.locator(`[data-testid="ticket"][data-ticket-id="${TICKET}"][data-state="closed"]`).waitFor();
  assert.equal(await page.getByTestId("ticket-close").count(), 0);
  const closed = await api(`/api/v1/tickets/${TICKET}`);
  assert.equal(closed.state, "closed");
  assert.equal(closed.closed_by, ADMIN);
  // The list's closed filter has it; the open one no longer does.
  await page.getByRole("link", { name: "← Tickets" }).click();
  await page.getByTestId("ticket-state").selectOption("closed");
  await page.locator(`[data-testid="ticket-row"][data-ticket-id="${TICKET}"][data-state="closed"]`).waitFor();
  assert.match(page.url(), /state=closed/);
  await page.getByTestId("ticket-state").selectOption("open");
  await row.waitFor({ state: "detached" });
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("screenshots", { skip: !process.env.SCREENSHOTS }, async () => {
  const dir = process.env.SCREENSHOTS;
  const pages = [
    ["overview", "#/overview", "stat-devices"],
    ["devices", "#/devices", "device-row"],
    ["device", `#/devices/${LIVE}`, "shadow-reported"],
    ["users", "#/users", "user-row"],
    ["tokens", "#/tokens", "token-row"],
    ["audit", "#/audit", "audit-row"],
    ["jobs", "#/jobs", "job-row"],
    ["tickets", "#/tickets?state=all", "ticket-row"],
    ["ticket", `#/tickets/${TICKET}`, "ticket-device-row"],
  ];
  const sizes = [
    ["desktop", { width: 1280, height: 800 }],
    ["phone", { width: 390, height: 844 }],
  ];
  for (const scheme of ["light", "dark"]) {
    for (const [size, viewport] of sizes) {
      const page = await newPage(viewport);
      await page.emulateMedia({ colorScheme: scheme });
      await page.goto(`${BASE}/#/login`);
      await page.getByTestId("login-email").waitFor();
      await page.screenshot({ path: `${dir}/login-${size}-${scheme}.png` });
      await login(page, ADMIN);
      for (const [name, hash, ready] of pages) {
        await page.goto(`${BASE}/${hash}`);
        await page.getByTestId(ready).first().waitFor();
        // Charts draw after their data arrives.
        await page.waitForTimeout(700);
        await page.screenshot({ path: `${dir}/${name}-${size}-${scheme}.png`, fullPage: size === "desktop" });
      }
      await page.context().close();
    }
  }
});
