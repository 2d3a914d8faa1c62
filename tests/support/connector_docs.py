"""Connector documents as an admin writes them, for the tests of parsing, `apptunnel create`
and the web app's sign-in routes: `saml_doc(**spec)` (the SAML connector okta at `ACS`,
spec keys replaced by `spec`) and `LDAP_DOC` (the LDAP connector corp-ldap, group `DEVS`
mapped to role dev)."""

from __future__ import annotations

ACS = "https://apptunnel.example.com/v1/webapi/saml/acs/okta"


def saml_doc(**spec) -> dict:
    base = {"acs": ACS, "entity_descriptor_url": "https://idp.example.com/metadata",
            "attributes_to_roles": [{"name": "groups", "value": "devs", "roles": ["dev"]},
                                    {"name": "groups", "value": "^.*-admins$",
                                     "roles": ["admin"]}]}
    base.update(spec)
    return {"kind": "saml", "metadata": {"name": "okta"}, "spec": base}


DEVS = "cn=devs,ou=groups,dc=example,dc=org"
LDAP_DOC = {"kind": "ldap", "metadata": {"name": "corp-ldap"},
            "spec": {"url": "ldaps://ldap.example.org", "bind_dn": "cn=svc,dc=example,dc=org",
                     "bind_password_file": "/nonexistent",
                     "user_search_base": "dc=example,dc=org",
                     "groups_to_roles": [{"group": DEVS, "roles": ["dev"]}],
                     "attributes_to_traits": {"mail": "email"}}}
