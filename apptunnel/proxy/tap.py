"""`twistd apptunnel`: options and the service maker for the proxy."""

from twisted.python import usage

from apptunnel.config import ConfigError, load_proxy_config
from apptunnel.errors import ApptunnelError, os_error_text
from apptunnel.startup import startup_error

PROG = "apptunnel"


class Options(usage.Options):
    synopsis = "--config PATH"
    optParameters = [
        ["config", "c", None, "Path of the proxy's YAML configuration file."],
        ["worker", None, 0, "Internal: the worker index worker 0 starts this process as "
                            "(config `workers`).", int],
    ]

    def postOptions(self) -> None:
        """Load the config here, so a bad one is one line before anything starts.

        Not a UsageError: twistd would print its whole ``Options:`` block above it.
        """
        if not self["config"]:
            startup_error(PROG, "--config is required (e.g. --config etc/proxy.yaml)")
        try:
            self.proxy_config = load_proxy_config(self["config"])
        except ConfigError as err:
            startup_error(PROG, str(err))
        if not 0 <= self["worker"] < self.proxy_config.workers:
            startup_error(PROG, f"--worker {self['worker']}: the config has "
                                f"{self.proxy_config.workers} workers")


def makeService(options: Options):
    """Build the proxy; files it cannot use (keys, certificates) end twistd with one line."""
    from twisted.internet import reactor

    from apptunnel.proxy.service import ProxyService

    try:
        return ProxyService(options.proxy_config, reactor, worker=options["worker"])
    except OSError as err:
        startup_error(PROG, os_error_text(err))
    except (ApptunnelError, ValueError) as err:
        startup_error(PROG, str(err))
