"""Sign-in through an organisation's identity provider: connectors as resources.

``specs`` parses ``kind: ldap | oidc | saml`` documents, ``mapping`` turns claims into
roles and traits, ``signin`` is the one path from an external identity to a user record,
``store`` reads connectors from storage, ``ldap`` is the LDAP connector.
"""
