"""`twistd apptunnel`: options and the service maker for the proxy."""

from twisted.python import usage

from apptunnel.config import ConfigError, load_proxy_config


class Options(usage.Options):
    synopsis = "--config PATH"
    optParameters = [
        ["config", "c", None, "Path of the proxy's YAML configuration file."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required (e.g. --config etc/proxy.yaml)")


def makeService(options: Options):
    """Load the config and build the proxy; a bad config is one line from twistd."""
    from twisted.internet import reactor

    from apptunnel.proxy.service import ProxyService

    try:
        config = load_proxy_config(options["config"])
    except ConfigError as err:
        raise usage.UsageError(str(err)) from None
    return ProxyService(config, reactor)
