// Security keys and passkeys (WebAuthn) for the account page and the second sign-in step.
// A form with data-webauthn="ID" finds its options (JSON made by the proxy, with a
// single-use challenge) in <script type="application/json" id="ID">; its button asks the
// browser's authenticator, puts the answer in the form's "webauthn" field and submits.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-webauthn]")) {
    const button = form.querySelector("button[data-webauthn-start]");
    const status = form.querySelector("[data-webauthn-status]");
    button.addEventListener("click", async (event) => {
      event.preventDefault();
      if (!form.reportValidity()) return;
      const options = JSON.parse(document.getElementById(form.dataset.webauthn).textContent);
      try {
        const credential = form.dataset.webauthnMode === "create"
          ? await navigator.credentials.create(
              {publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(options)})
          : await navigator.credentials.get(
              {publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(options)});
        form.querySelector("input[name=webauthn]").value = JSON.stringify(credential.toJSON());
        form.submit();
      } catch (err) {
        if (status) status.textContent = "The security key did not answer: " + err.message;
      }
    });
  }
});
