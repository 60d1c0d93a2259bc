// #/set-password?token=mrp_...: the one-time link from `mooring user create` or the Users page.
import { html, useState, api, PageTitle } from "../lib.js";

const MIN_LEN = 12;

export default function SetPassword({ query }) {
  const token = query.get("token") || "";
  const [pw, setPw] = useState("");
  const [confirm, setConfirm] = useState("");
  const [error, setError] = useState(null);
  const [done, setDone] = useState(false);
  const [busy, setBusy] = useState(false);

  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    if (pw !== confirm) return setError("The two passwords differ.");
    if (pw.length < MIN_LEN) return setError(`Use at least ${MIN_LEN} characters.`);
    setBusy(true);
    try {
      await api("POST", "/auth/password", { token, password: pw }, { noRedirect: true });
      setDone(true);
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };

  return html`<div class="card narrow login">
    <div class="brand-big"><img src="app/icon.svg" alt="" width="40" height="40" /> Mooring</div>
    <${PageTitle}>Set your password</${PageTitle}>
    ${!token && html`<p class="form-error" data-testid="password-error" role="alert">This link has no token: open the whole link you were given.</p>`}
    ${done
      ? html`<p class="ok" data-testid="password-done" role="status">Your password is set. <a href="#/login">Sign in</a>.</p>`
      : html`<form onSubmit=${submit}>
          <label>New password<input type="password" autocomplete="new-password" required minlength=${MIN_LEN} data-testid="password-new" value=${pw} onInput=${(e) => setPw(e.target.value)} autofocus /></label>
          <label>Repeat it<input type="password" autocomplete="new-password" required data-testid="password-confirm" value=${confirm} onInput=${(e) => setConfirm(e.target.value)} /></label>
          ${error && html`<p class="form-error" data-testid="password-error" role="alert">${error}</p>`}
          <button type="submit" class="btn primary wide" data-testid="password-submit" disabled=${busy || !token}>Set password</button>
        </form>`}
  </div>`;
}
