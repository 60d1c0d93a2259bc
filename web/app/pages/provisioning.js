// #/provisioning: how devices get their identity (issue 16): the pipeline funnel, claim tokens
// (create — the token is shown once —, list, revoke), the certificates that expire soon, and
// (admins) the fleet CA with its rollover (begin, follow, retire) and the registered
// manufacturer CAs (disable, enable).
import { html, useState, api, useApi, can, toast, Empty, Async, Dialog, Confirm, PageTitle, fmtTime, fmtNum } from "../lib.js";

const enc = encodeURIComponent;
const DAY_MS = 86_400_000;
const TTLS = [
  { label: "1 hour", value: "1h" },
  { label: "24 hours", value: "24h" },
  { label: "7 days", value: "7d" },
  { label: "30 days", value: "30d" },
];
const EXPIRING = [7, 30, 90];
const STAGE_LABELS = {
  registered: "Registered",
  first_connect: "First connect",
  first_telemetry: "First telemetry",
  installed: "Installed",
};

function Funnel() {
  const res = useApi("/provisioning/funnel");
  return html`<section class="card" data-testid="funnel">
    <h2>Pipeline funnel</h2>
    <${Async} res=${res} label="Counting…">${(f) => {
      const top = Math.max(1, f.stages[0]?.devices ?? 0);
      return html`<ol class="funnel">
        ${f.stages.map((s) => html`<li key=${s.step} data-testid=${"funnel-" + s.step} data-count=${s.devices}>
          <span class="funnel-label">${STAGE_LABELS[s.step] || s.step}</span>
          <span class="funnel-bar" style=${{ width: `${Math.round((100 * s.devices) / top)}%` }}></span>
          <span class="funnel-count">${fmtNum(s.devices)}</span>
        </li>`)}
      </ol>`;
    }}</${Async}>
  </section>`;
}

/** `k=v, k2=v2` typed by a person: the tags, or an error message. */
function parseTags(text) {
  const tags = {};
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const i = part.indexOf("=");
    if (i <= 0) return [null, `"${part}" is not key=value`];
    tags[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return [tags, null];
}

function CreateClaim({ onCreated, onClose }) {
  const [count, setCount] = useState("1");
  const [ttl, setTtl] = useState("24h");
  const [tags, setTags] = useState("");
  const [name, setName] = useState("");
  const [assignIds, setAssignIds] = useState(false);
  const [error, setError] = useState(null);
  const [created, setCreated] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    const [t, bad] = parseTags(tags);
    if (bad) return setError(bad);
    const n = Number(count);
    if (!Number.isInteger(n) || n < 1) return setError("Devices must be a whole number, at least 1");
    try {
      const body = { count: n, ttl, tags: t, assign_ids: assignIds };
      if (name.trim()) body.name = name.trim();
      const c = await api("POST", "/claims", body);
      setCreated(c);
      onCreated();
    } catch (err) {
      setError(err.message);
    }
  };
  if (created) {
    return html`<${Dialog} title="Claim created" onClose=${onClose} testid="claim-dialog">
      <p>Copy the token now: it is shown only this once. ${created.uses_max === 1 ? "One device" : `${fmtNum(created.uses_max)} devices`} may enroll with it until ${fmtTime(created.expires_at)}.</p>
      <p class="secret mono" data-testid="claim-token">${created.token}</p>
      <p class="hint">On the device: <code>mooring-agent enroll --claim …</code> (docs/provisioning.md).</p>
      <div class="actions"><button type="button" class="btn primary" onClick=${onClose}>Done</button></div>
    </${Dialog}>`;
  }
  return html`<${Dialog} title="New claim token" onClose=${onClose} testid="claim-dialog">
    <form onSubmit=${submit}>
      <label>Name (optional)<input data-testid="claim-name" value=${name} onInput=${(e) => setName(e.target.value)} placeholder="batch 2026-12" autofocus /></label>
      <label>Devices that may enroll<input type="number" min="1" data-testid="claim-count" value=${count} onInput=${(e) => setCount(e.target.value)} required /></label>
      <label>Valid for<select data-testid="claim-ttl" value=${ttl} onChange=${(e) => setTtl(e.target.value)}>${TTLS.map((x) => html`<option value=${x.value}>${x.label}</option>`)}</select></label>
      <label>Tags for the devices (optional)<input class="mono" data-testid="claim-tags" placeholder="site=oslo, batch=7" value=${tags} onInput=${(e) => setTags(e.target.value)} /></label>
      <label class="check-chip"><input type="checkbox" data-testid="claim-assign-ids" checked=${assignIds} onChange=${(e) => setAssignIds(e.target.checked)} /> The server chooses device ids</label>
      ${error && html`<p class="form-error" role="alert" data-testid="claim-error">${error}</p>`}
      <div class="actions"><button type="button" class="btn" onClick=${onClose}>Cancel</button><button type="submit" class="btn primary" data-testid="claim-submit">Create claim</button></div>
    </form>
  </${Dialog}>`;
}

function Claims() {
  const res = useApi("/claims?limit=500");
  const [creating, setCreating] = useState(false);
  const [revoking, setRevoking] = useState(null);
  const revoke = async (c) => {
    try {
      await api("DELETE", `/claims/${enc(c.id)}`);
      toast(`Claim ${c.name || c.id} revoked`);
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
    setRevoking(null);
  };
  const tagText = (tags) => Object.entries(tags || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  return html`<section class="card" data-testid="claims">
    <div class="card-head"><h2>Claim tokens</h2>
      ${can("devices.write") && html`<button type="button" class="btn primary small" data-testid="claim-create" onClick=${() => setCreating(true)}>New claim</button>`}
    </div>
    <${Async} res=${res} label="Loading claims…">${(d) => d.claims.length === 0 ? html`<${Empty}>No claims. A claim lets devices enroll with their own key.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>Claim</th><th>Enrolled</th><th>Tags</th><th>State</th><th>Expires</th><th><span class="sr-only">Actions</span></th></tr></thead>
      <tbody>${d.claims.map((c) => html`<tr key=${c.id} data-testid="claim-row" data-claim-id=${c.id} data-state=${c.state}>
        <td data-label="Claim"><strong>${c.name || "—"}</strong> <code class="muted">${c.id}</code>${c.assign_ids ? html` <span class="badge">ids assigned</span>` : ""}</td>
        <td data-label="Enrolled" data-testid="claim-uses">${fmtNum(c.uses)} / ${fmtNum(c.uses_max)}</td>
        <td data-label="Tags">${tagText(c.tags) ? html`<code>${tagText(c.tags)}</code>` : html`<span class="muted">none</span>`}</td>
        <td data-label="State"><span class=${"badge " + (c.state === "live" ? "on" : "off")}>${c.state}</span></td>
        <td data-label="Expires">${fmtTime(c.expires_at)}</td>
        <td class="row-actions">${can("devices.write") && c.state !== "revoked" && html`<button type="button" class="btn small danger" data-testid="claim-revoke" onClick=${() => setRevoking(c)}>Revoke</button>`}</td>
      </tr>`)}</tbody></table></div>`}</${Async}>
    ${creating && html`<${CreateClaim} onClose=${() => setCreating(false)} onCreated=${() => res.reload()} />`}
    ${revoking && html`<${Confirm} title="Revoke claim" text=${`Revoke ${revoking.name || revoking.id}? Devices not yet enrolled with it are refused from now on; enrolled ones keep their certificates.`} okLabel="Revoke" danger onOk=${() => revoke(revoking)} onCancel=${() => setRevoking(null)} />`}
  </section>`;
}

function Expiring() {
  const [days, setDays] = useState(30);
  const res = useApi(`/certificates?expiring_within_ms=${days * DAY_MS}&limit=100`, [days]);
  return html`<section class="card" data-testid="expiring">
    <div class="card-head"><h2>Certificates expiring soon</h2>
      <label class="inline">Within <select data-testid="expiring-days" value=${days} onChange=${(e) => setDays(Number(e.target.value))}>${EXPIRING.map((d) => html`<option value=${d}>${d} days</option>`)}</select></label>
    </div>
    <${Async} res=${res} label="Loading certificates…">${(d) => d.certificates.length === 0 ? html`<${Empty}>No active certificate expires within ${days} days.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>Device</th><th>Serial</th><th>Expires</th></tr></thead>
      <tbody>${d.certificates.map((c) => html`<tr key=${c.serial} data-testid="expiring-row" data-device-id=${c.device_id}>
        <td data-label="Device"><a href=${"#/devices/" + enc(c.device_id)}>${c.device_id}</a></td>
        <td data-label="Serial"><code>${c.serial}</code></td>
        <td data-label="Expires">${fmtTime(c.not_after)}</td>
      </tr>`)}</tbody></table>
      ${d.next_cursor && html`<p class="muted">The first 100 are shown: <code>mooring cert expiring --within ${days}d</code> lists them all.</p>`}</div>`}</${Async}>
  </section>`;
}

function FleetCa() {
  const res = useApi("/cas/fleet");
  const [asking, setAsking] = useState(null);
  const [busy, setBusy] = useState(false);
  const step = async (what) => {
    setBusy(true);
    try {
      if (what === "begin") {
        await api("POST", "/cas/fleet/rollover", {});
        toast("A new fleet CA issues now; both are trusted. Devices are being moved to it.");
      } else {
        await api("POST", "/cas/fleet/retire", {});
        toast("The previous fleet CA is retired.");
      }
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
    setBusy(false);
    setAsking(null);
  };
  const caLine = (ca) => html`<strong>${ca.subject}</strong> <code class="muted" title=${ca.sha256}>${ca.sha256.slice(0, 16)}</code>, expires ${fmtTime(ca.not_after)}`;
  return html`<section class="card" data-testid="fleet-ca">
    <div class="card-head"><h2>Fleet CA</h2>
      ${res.data && (res.data.rolling_over
        ? html`<button type="button" class="btn small danger" data-testid="fleet-ca-retire" disabled=${busy || res.data.previous_certificates > 0} onClick=${() => setAsking("retire")}>Retire previous CA</button>`
        : html`<button type="button" class="btn small" data-testid="fleet-ca-rollover" disabled=${busy} onClick=${() => setAsking("begin")}>Roll over…</button>`)}
    </div>
    <${Async} res=${res} label="Loading the fleet CA…">${(d) => html`<dl class="facts" data-testid="fleet-ca-state" data-rolling-over=${String(d.rolling_over)}>
      <dt>Issuing</dt><dd>${caLine(d.issuing)}</dd>
      ${d.previous && html`<dt>Previous (still trusted)</dt><dd>${caLine(d.previous)}</dd>
        <dt>Devices still on it</dt><dd data-testid="fleet-ca-left">${fmtNum(d.previous_certificates)}${d.previous_certificates > 0 && html` <span class="muted">— retire once this is 0 (the rotation moves them${d.rotation_id ? html`: <code>${d.rotation_id}</code>` : ""}), or with <code>mooring ca rotate-fleet retire --force</code></span>`}</dd>`}
    </dl>`}</${Async}>
    ${asking === "begin" && html`<${Confirm} title="Roll over the fleet CA" text="A new fleet CA will issue every certificate from now on. Both CAs stay trusted, and a rotation moves every device to a certificate from the new one (100 a minute). Retire the previous CA once no device holds one of its certificates." okLabel="Roll over" onOk=${() => step("begin")} onCancel=${() => setAsking(null)} busy=${busy} />`}
    ${asking === "retire" && html`<${Confirm} title="Retire the previous fleet CA" text="The previous CA will no longer be trusted, and the server will present a certificate from the new one. Clients that do not trust the new CA yet can no longer connect." okLabel="Retire" danger onOk=${() => step("retire")} onCancel=${() => setAsking(null)} busy=${busy} />`}
  </section>`;
}

function Cas() {
  const res = useApi("/cas");
  const [busy, setBusy] = useState(null);
  const toggle = async (ca) => {
    setBusy(ca.id);
    try {
      await api("POST", `/cas/${enc(ca.id)}/${ca.enabled ? "disable" : "enable"}`);
      toast(`CA ${ca.subject} ${ca.enabled ? "disabled" : "enabled"}`);
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
    setBusy(null);
  };
  const tagText = (tags) => Object.entries(tags || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  return html`<section class="card" data-testid="cas">
    <h2>Registered manufacturer CAs</h2>
    <p class="muted">Devices whose certificates chain to an enabled CA may connect; with auto-register they are registered on their first connection. Register one with <code>mooring ca register --cert ca.pem</code>.</p>
    <${Async} res=${res} label="Loading CAs…">${(d) => d.cas.length === 0 ? html`<${Empty}>No registered CAs.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>CA</th><th>Auto-register</th><th>Tags</th><th>State</th><th>Expires</th><th><span class="sr-only">Actions</span></th></tr></thead>
      <tbody>${d.cas.map((ca) => html`<tr key=${ca.id} data-testid="ca-row" data-ca-id=${ca.id} data-enabled=${String(ca.enabled)}>
        <td data-label="CA"><strong>${ca.subject}</strong> <code class="muted">${ca.id}</code></td>
        <td data-label="Auto-register">${ca.auto_register ? "yes" : "no"}</td>
        <td data-label="Tags">${tagText(ca.tags) ? html`<code>${tagText(ca.tags)}</code>` : html`<span class="muted">none</span>`}</td>
        <td data-label="State"><span class=${"badge " + (ca.enabled ? "on" : "off")}>${ca.enabled ? "enabled" : "disabled"}</span></td>
        <td data-label="Expires">${fmtTime(ca.not_after)}</td>
        <td class="row-actions"><button type="button" class=${"btn small" + (ca.enabled ? " danger" : "")} data-testid="ca-toggle" disabled=${busy === ca.id} onClick=${() => toggle(ca)}>${ca.enabled ? "Disable" : "Enable"}</button></td>
      </tr>`)}</tbody></table></div>`}</${Async}>
  </section>`;
}

export default function Provisioning() {
  return html`
    <${PageTitle} sub="How devices get their identity: claims, certificates, the pipeline.">Provisioning</${PageTitle}>
    <div class="grid2">
      <${Funnel} />
      <${Expiring} />
    </div>
    <${Claims} />
    ${can("pki.manage") && html`<${FleetCa} />`}
    ${can("pki.manage") && html`<${Cas} />`}
  `;
}
