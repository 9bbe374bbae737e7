"""Celery over rediss://: the broker checks the server's certificate unless the URL says
otherwise (kombu alone would not check it)."""

from __future__ import annotations

import ssl

from service.config import Settings
from service.taskqueue import celery_config, create_celery


def test_a_plain_redis_url_has_no_tls_options() -> None:
    config = celery_config(Settings(redis_url="redis://:pw@127.0.0.1:6379/0"))
    assert "broker_use_ssl" not in config
    assert "redis_backend_use_ssl" not in config


def test_a_rediss_url_requires_a_valid_certificate() -> None:
    config = celery_config(Settings(redis_url="rediss://:pw@redis.internal:6380/0"))
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert config["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_tls_parameters_in_the_url_reach_the_broker_connection() -> None:
    url = "rediss://:pw@redis.internal:6380/0?ssl_ca_certs=/etc/fitserve/redis-ca.pem"
    connection = create_celery(Settings(redis_url=url)).connection_for_write()
    # The URL's ssl_* replace ours; redis-py's SSLConnection then requires a valid
    # certificate by default (ssl_cert_reqs=required).
    assert connection.ssl == {"ssl_ca_certs": "/etc/fitserve/redis-ca.pem"}
    assert connection.transport_cls == "rediss"
    assert connection.password == "pw"
