// #/login: email + password; afterwards back to the page that sent the person here.
import { html, useState, useEffect, api, setMe, navigate, session, PageTitle } from "../lib.js";

export default function Login({ query }) {
  const [email, setEmail] = useState("");
  const [password, setPassword] = useState("");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const next = query.get("next") || "/overview";
  const target = "#/" + next.replace(/^[#/]+/, "");

  useEffect(() => {
    if (session.me) navigate(target, true);
  }, []);

  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      await api("POST", "/auth/login", { email, password }, { noRedirect: true });
      setMe(await api("GET", "/auth/me", undefined, { noRedirect: true }));
      navigate(target.startsWith("#/login") ? "#/overview" : target, true);
    } catch (err) {
      setError(err.status === 401 ? "Wrong email or password." : err.message);
      setBusy(false);
    }
  };

  return html`<div class="card narrow login">
    <div class="brand-big"><img src="app/icon.svg" alt="" width="40" height="40" /> Mooring</div>
    <${PageTitle}>Sign in</${PageTitle}>
    <form onSubmit=${submit}>
      <label>Email<input type="email" autocomplete="username" required data-testid="login-email" value=${email} onInput=${(e) => setEmail(e.target.value)} autofocus /></label>
      <label>Password<input type="password" autocomplete="current-password" required data-testid="login-password" value=${password} onInput=${(e) => setPassword(e.target.value)} /></label>
      ${error && html`<p class="form-error" data-testid="login-error" role="alert">${error}</p>`}
      <button type="submit" class="btn primary wide" data-testid="login-submit" disabled=${busy}>${busy ? "Signing in…" : "Sign in"}</button>
    </form>
    <p class="hint">No account yet? An administrator creates one with <code>mooring user create</code> and gives you a link to set your password.</p>
  </div>`;
}
