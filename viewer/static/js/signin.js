// The sign-in page: username and password, then (staff, operators, and patients who
// set one up) the code of an authenticator app. Where to go next depends on the
// account: patients to their portal, institution staff to the inbox.

import { t } from "./i18n.js";
import { errorText, say, startPage } from "./page.js";
import { homeOf, signIn, whoAmI } from "./session.js";

const form = document.getElementById("signin");
const stepCode = document.getElementById("step-code");
const stepPassword = document.getElementById("step-password");
const back = document.getElementById("back");
const code = document.getElementById("code");
let lastError = null;

function showError(error) {
  lastError = error;
  say("signin-error", error ? errorText(error) : "", "error");
}

function go(account) {
  const home = homeOf(account);
  if (home) location.assign(home);
  else showError({ code: "no-portal" });
}

function codeStep(on) {
  stepCode.hidden = !on;
  stepPassword.hidden = on;
  back.hidden = !on;
  (on ? code : document.getElementById("password")).focus();
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const username = document.getElementById("username").value.trim();
  const password = document.getElementById("password").value;
  if (!username || !password) {
    showError({ code: "missing" });
    document.getElementById(username ? "password" : "username").focus();
    return;
  }
  const submit = document.getElementById("submit");
  submit.disabled = true;
  try {
    go(await signIn(username, password, stepCode.hidden ? null : code.value.trim()));
  } catch (error) {
    if (error.code === "code-required") {
      showError(stepCode.hidden ? null : error);
      codeStep(true);
    } else {
      showError(error);
      if (!stepCode.hidden) {
        code.value = "";
        code.focus();
      }
    }
  } finally {
    submit.disabled = false;
  }
});

// Disabled in the page until now (see signin.html).
document.getElementById("submit").disabled = false;

back.addEventListener("click", () => {
  code.value = "";
  showError(null);
  codeStep(false);
});

await startPage(() => {
  if (lastError) showError(lastError);
  document.title = `studybridge · ${t("signin.title")}`;
});
document.title = `studybridge · ${t("signin.title")}`;
const account = await whoAmI().catch(() => null);
if (account && homeOf(account)) location.assign(homeOf(account));
else document.getElementById("username").focus();
