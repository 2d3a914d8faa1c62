"""`twistd apptunnel`: options and the service maker for the proxy."""

from twisted.python import usage

from apptunnel.config import ConfigError, load_proxy_config


class Options(usage.Options):
    synopsis = "--config PATH"
    optParameters = [
        ["config", "c", None, "Path of the proxy's YAML configuration file."],
    ]

    def postOptions(self) -> None:
        """Load the config here: twistd prints a UsageError as one line, without a traceback."""
        if not self["config"]:
            raise usage.UsageError("--config is required (e.g. --config etc/proxy.yaml)")
        try:
            self.proxy_config = load_proxy_config(self["config"])
        except ConfigError as err:
            raise usage.UsageError(str(err)) from None


def makeService(options: Options):
    """Build the proxy; files it cannot use (keys, certificates) end twistd with one line."""
    from twisted.internet import reactor

    from apptunnel.backend import BackendError
    from apptunnel.proxy.service import ProxyService

    try:
        return ProxyService(options.proxy_config, reactor)
    except (ConfigError, BackendError, OSError, ValueError) as err:
        raise SystemExit(f"apptunnel: error: {err}") from None
