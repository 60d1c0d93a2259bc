// Browser tests of the device page's Gateway section (docs/edge.md, docs/dashboard.md): Debian's
// chromium driven by playwright-core, against a real `mooring serve` that
// crates/mooring/tests/dashboard.rs (`gateways_in_a_real_browser`) started with three devices
// that stay offline: a gateway, a child attached to it and a lone device. Run through that Rust
// test (`cargo test -p mooring --test dashboard gateways`), which passes everything in the
// environment:
//   MOORING_URL, MOORING_TOKEN (admin API token), ADMIN_EMAIL, VIEWER_EMAIL, PASSWORD,
//   GATEWAY (the gateway), CHILD (attached to it), LONE (neither), LOCAL_DEVICE (one whose
//   command ran on its local API and synced), CHROMIUM (the browser binary).
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
const GATEWAY = env("GATEWAY");
const CHILD = env("CHILD");
const LONE = env("LONE");
const LOCAL_DEVICE = env("LOCAL_DEVICE");
const MISSING = "gw-does-not-exist";
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

/// A read through the API as the admin token (to check what the browser did, from outside):
/// [status, body].
async function get(path) {
  const r = await fetch(`${BASE}${path}`, { headers: { authorization: `Bearer ${TOKEN}` } });
  const text = await r.text();
  return [r.status, text ? JSON.parse(text) : null];
}

/// The gateway `id` is attached to, per the API: its id, or null (404 not_attached).
async function gatewayOf(id) {
  const [status, body] = await get(`/api/v1/devices/${id}/gateway`);
  if (status === 404) {
    assert.equal(body.error.code, "not_attached", JSON.stringify(body));
    return null;
  }
  assert.equal(status, 200, JSON.stringify(body));
  assert.equal(body.child, id);
  return body.gateway;
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

/// Opens `id`'s device page; returns its Gateway section.
async function openDevice(page, id) {
  await page.goto(`${BASE}/#/devices/${id}`);
  await page.locator('[data-testid="device-title"]').filter({ hasText: new RegExp(`^${id}$`) }).waitFor();
  const section = page.getByTestId("device-gateway");
  await section.waitFor();
  return section;
}

const attached = (section, gateway) => section.locator(`[data-testid="gateway-attached"][data-gateway="${gateway}"]`);
const child = (section, id) => section.locator(`[data-testid="gateway-child"][data-child-id="${id}"]`);

/// The child's page says which gateway it is attached to, since when, with a link to it.
async function checkAttachment(page) {
  const section = await openDevice(page, CHILD);
  const line = attached(section, GATEWAY);
  await line.waitFor();
  assert.match(await line.innerText(), new RegExp(`Attached to gateway ${GATEWAY}\\s+since `));
  assert.equal((await section.getByTestId("gateway-link").innerText()).trim(), GATEWAY);
  assert.equal(await section.getByTestId("gateway-link").getAttribute("href"), `#/devices/${GATEWAY}`);
  assert.equal(await section.getByTestId("gateway-child").count(), 0);
  return section;
}

test("gateways: a viewer sees the attachment and the children, and neither Detach nor the attach form", async () => {
  const page = await newPage();
  await login(page, VIEWER);
  const section = await checkAttachment(page);
  assert.equal(await section.getByTestId("gateway-detach").count(), 0, "Detach shown to a viewer");
  assert.equal(await section.getByTestId("gateway-attach-form").count(), 0, "attach form shown to a viewer");

  const gw = await openDevice(page, GATEWAY);
  await child(gw, CHILD).waitFor();
  const lone = await openDevice(page, LONE);
  await lone.getByTestId("empty").filter({ hasText: "Not attached to a gateway and no children" }).waitFor();
  assert.equal(await lone.getByTestId("gateway-attach-form").count(), 0, "attach form shown to a viewer");
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("gateways: an admin follows a child to its gateway, attaches a lone device from its page (a wrong gateway refused) and detaches it", async () => {
  const page = await newPage();
  await login(page, ADMIN);

  // The gateway's page lists its children as the API does: the child, offline, linked.
  let section = await openDevice(page, GATEWAY);
  const row = child(section, CHILD);
  await row.waitFor();
  const [status, children] = await get(`/api/v1/devices/${GATEWAY}/children`);
  assert.equal(status, 200, JSON.stringify(children));
  assert.deepEqual(children.children.map((c) => c.id), [CHILD]);
  assert.equal(await section.getByTestId("gateway-child").count(), 1);
  assert.equal(await row.getAttribute("data-online"), "false");
  assert.match(await row.innerText(), /\boffline\b/);
  assert.equal(await row.getByRole("link", { name: CHILD }).getAttribute("href"), `#/devices/${CHILD}`);
  // A gateway is no child: no attachment, no empty state.
  assert.equal(await section.getByTestId("gateway-attached").count(), 0);
  assert.equal(await section.getByTestId("empty").count(), 0);

  // The child's page links to the gateway, and the link opens the gateway's page.
  section = await checkAttachment(page);
  await section.getByTestId("gateway-detach").waitFor();
  await section.getByTestId("gateway-link").click();
  await page.waitForFunction((hash) => location.hash === hash, `#/devices/${GATEWAY}`);
  await page.locator('[data-testid="device-title"]').filter({ hasText: new RegExp(`^${GATEWAY}$`) }).waitFor();
  await child(page.getByTestId("device-gateway"), CHILD).waitFor();

  // The lone device: the empty state and the attach form. A gateway that does not exist and the
  // device itself are refused with the server's message, and nothing changes.
  section = await openDevice(page, LONE);
  await section.getByTestId("empty").filter({ hasText: "Not attached to a gateway and no children" }).waitFor();
  const form = section.getByTestId("gateway-attach-form");
  await form.getByTestId("gateway-attach-id").fill(MISSING);
  await form.getByTestId("gateway-attach-submit").click();
  await section.getByTestId("gateway-attach-error").filter({ hasText: `device ${MISSING} not found` }).waitFor();
  assert.equal(await gatewayOf(LONE), null);
  await form.getByTestId("gateway-attach-id").fill(LONE);
  await form.getByTestId("gateway-attach-submit").click();
  await section.getByTestId("gateway-attach-error").filter({ hasText: "cannot be its own gateway" }).waitFor();
  assert.equal(await gatewayOf(LONE), null);

  // Attached through the form: the page says so and the API agrees.
  await form.getByTestId("gateway-attach-id").fill(GATEWAY);
  await form.getByTestId("gateway-attach-submit").click();
  await attached(section, GATEWAY).waitFor();
  assert.equal(await section.getByTestId("gateway-attach-form").count(), 0);
  assert.equal(await gatewayOf(LONE), GATEWAY);

  // Detach asks first; canceling changes nothing.
  await section.getByTestId("gateway-detach").click();
  const dialog = page.getByTestId("confirm-dialog");
  await dialog.waitFor();
  assert.match(await dialog.innerText(), new RegExp(`Detach ${LONE} from gateway ${GATEWAY}\\?`));
  await dialog.getByTestId("confirm-cancel").click();
  await dialog.waitFor({ state: "detached" });
  assert.equal(await gatewayOf(LONE), GATEWAY);
  await attached(section, GATEWAY).waitFor();
  await section.getByTestId("gateway-detach").click();
  await dialog.getByTestId("confirm-ok").click();
  await dialog.waitFor({ state: "detached" });
  await section.getByTestId("empty").filter({ hasText: "Not attached to a gateway and no children" }).waitFor();
  await section.getByTestId("gateway-attach-form").waitFor();
  assert.equal(await section.getByTestId("gateway-attached").count(), 0);
  assert.equal(await gatewayOf(LONE), null);

  // The gateway still has its one child.
  section = await openDevice(page, GATEWAY);
  await child(section, CHILD).waitFor();
  assert.equal(await child(section, LONE).count(), 0);
  assert.equal(await section.getByTestId("gateway-child").count(), 1);
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("local control: a command run on the device's local API reads executed locally, on device time with when it synced", async () => {
  const page = await newPage();
  await login(page, VIEWER);
  await openDevice(page, LOCAL_DEVICE);
  const row = page.getByTestId("command-row").filter({ hasText: "unlock" });
  await row.waitFor();
  assert.equal(await row.getAttribute("data-state"), "succeeded");
  assert.equal((await row.getByTestId("command-local").innerText()).trim(), "executed locally");
  assert.match(await row.getByTestId("command-synced").innerText(), /device time; synced /);
  assert.match(await row.innerText(), /succeeded \{"opened":true\}/);
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test("screenshots", { skip: !process.env.SCREENSHOTS }, async () => {
  const dir = process.env.SCREENSHOTS;
  // The Gateway section of a gateway (its children), a child (its gateway) and a lone device.
  const pages = [
    ["gateway", GATEWAY, "gateway-child"],
    ["gateway-child", CHILD, "gateway-attached"],
    ["gateway-lone", LONE, "empty"],
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
      for (const [name, id, ready] of pages) {
        const section = await openDevice(page, id);
        await section.getByTestId(ready).first().waitFor();
        await section.screenshot({ path: `${dir}/${name}-${size}-${scheme}.png` });
      }
      await page.context().close();
    }
  }
});
