"""MODELYARD_BROKER_URL's forms (shared/broker.py): one URL, the same meaning to Celery, kombu and our clients.

No server runs here: the sentinel URL is checked by what it parses to and by what Celery, kombu and
redis-py are configured with. tests/reliability/test_sentinel_failover.py runs it against real sentinels.
"""

from __future__ import annotations

import pytest
import redis
from celery.app.utils import filter_hidden_settings
from kombu import Connection
from redis.sentinel import SentinelConnectionPool

from producer import api
from shared.broker import celery_connection, parse_sentinel, redact, redis_client
from shared.celery_app import configured_broker_url, make_celery
from shared.errors import UserInputError
from shared.jobs import JobStore
from shared.redis_server import free_port
from shared.settings import Settings

URL = ("sentinel://:s3cret@10.0.0.1:26379;sentinel://10.0.0.2;sentinel://10.0.0.3:26380/2"
       "?master_name=mymaster&sentinel_password=sentinels-own")


def test_a_sentinel_url_names_every_sentinel_the_master_and_its_credentials():
    parsed = parse_sentinel(URL)
    assert parsed.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert parsed.master_name == "mymaster"
    assert (parsed.password, parsed.db, parsed.sentinel_password, parsed.ssl) == ("s3cret", 2, "sentinels-own", None)


def test_celery_gets_the_credentials_on_every_part_and_the_master_name_in_both_transport_options():
    conf = make_celery(Settings(), broker_url=URL).conf
    assert conf.broker_url == conf.result_backend == (
        "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26379/2;sentinel://:s3cret@10.0.0.3:26380/2")
    for options in (conf.broker_transport_options, conf.result_backend_transport_options):
        assert options["master_name"] == "mymaster"
        assert options["sentinel_kwargs"]["password"] == "sentinels-own"
    assert conf.broker_transport_options["visibility_timeout"] == conf.result_backend_transport_options[
        "visibility_timeout"]
    assert configured_broker_url(conf) == URL


def test_kombu_keeps_the_password_and_database_when_it_fails_over_to_the_next_sentinel():
    connection = Connection(celery_connection(URL).url)
    connection.maybe_switch_next()  # what kombu does when it cannot connect through the current part
    assert (connection.transport_cls, connection.hostname, connection.port) == ("sentinel", "10.0.0.2", 26379)
    assert (connection.password, connection.virtual_host) == ("s3cret", "2")


def test_the_result_backend_is_celerys_sentinel_backend_for_the_same_master():
    backend = make_celery(Settings(), broker_url=URL).backend
    assert type(backend).__name__ == "SentinelBackend"
    assert [(h["host"], h["port"]) for h in backend.connparams["hosts"]] == [
        ("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)]
    assert (backend.connparams["password"], backend.connparams["db"]) == ("s3cret", 2)


def test_redis_client_of_a_sentinel_url_asks_the_sentinels_for_the_master():
    client = redis_client(URL, socket_timeout=7)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    assert pool.connection_kwargs["password"] == "s3cret" and pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["socket_timeout"] == 7
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26379, 26380]
    assert {s.connection_pool.connection_kwargs["password"] for s in sentinels} == {"sentinels-own"}
    # a sentinel that does not answer is asked once, then the next one (redis-py's default: 3 retries, backoff)
    assert {s.connection_pool.make_connection().retry._retries for s in sentinels} == {0}


def test_the_job_store_opens_the_broker_through_the_same_helper():
    assert isinstance(JobStore.from_url(URL, retention_s=60).redis.connection_pool, SentinelConnectionPool)
    plain = JobStore.from_url("redis://:pw@127.0.0.1:1/3", retention_s=60).redis.connection_pool
    assert not isinstance(plain, SentinelConnectionPool) and plain.connection_kwargs["db"] == 3


def test_tls_applies_to_the_sentinels_the_master_and_celerys_connections():
    url = "sentinel://:pw@s1:26379;sentinel://s2:26379/0?master_name=m&ssl=true&ssl_ca_certs=/etc/ca.pem"
    parsed = parse_sentinel(url)
    expected = {"ssl_cert_reqs": "required", "ssl_ca_certs": "/etc/ca.pem"}
    assert parsed.ssl == expected
    assert parsed.sentinel_kwargs()["ssl"] is True and parsed.master_kwargs()["ssl"] is True
    conf = make_celery(Settings(), broker_url=url).conf
    assert conf.broker_use_ssl == expected and conf.redis_backend_use_ssl == expected
    assert conf.broker_transport_options["sentinel_kwargs"]["ssl_ca_certs"] == "/etc/ca.pem"
    pool = redis_client(url).connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)


@pytest.mark.parametrize("url, message", [
    ("sentinel://:pw@h1:26379;sentinel://h2:26379/0", "needs the name of the master"),
    ("sentinel://h1:26379/0?master_name=", "needs the name of the master"),
    ("sentinel://h1:26379;redis://h2:6379/0?master_name=m", "must start with sentinel://"),
    ("sentinel://h1:26379/0?master_name=m&master=x", "unknown option 'master'"),
    ("sentinel://:a@h1:26379;sentinel://:b@h2:26379/0?master_name=m", "different passwords"),
    ("sentinel://h1:26379/0;sentinel://h2:26379/1?master_name=m", "different dbs"),
    ("sentinel://h1:26379/zero?master_name=m", "database must be a number"),
    ("sentinel://h1:port/0?master_name=m", "h1:port"),
    ("sentinel://h1/0?master_name=m&ssl_ca_certs=/ca.pem", "without ssl=true"),
    ("sentinel://h1/0?master_name=m&ssl=true&ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
])
def test_a_malformed_sentinel_url_is_a_clear_user_error(url, message):
    with pytest.raises(UserInputError, match=message) as error:
        make_celery(Settings(), broker_url=url)
    assert "MODELYARD_BROKER_URL" in str(error.value)


def test_a_missing_master_name_stops_the_job_store_too_and_the_message_keeps_the_password_out():
    with pytest.raises(UserInputError, match="master_name=") as error:
        JobStore.from_url("sentinel://:hunter2@h1:26379;sentinel://h2:26379/0?sentinel_password=hunter3")
    assert "hunter2" not in str(error.value) and "hunter3" not in str(error.value)


def test_the_conf_a_worker_shows_flower_and_inspect_conf_keeps_every_password_out():
    shown = str(filter_hidden_settings(make_celery(Settings(), broker_url=URL).conf))
    assert "s3cret" not in shown and "sentinels-own" not in shown


def test_redact_hides_every_password_of_every_part():
    shown = redact(URL.replace("sentinel://10.0.0.2", "sentinel://:s3cret@10.0.0.2"))
    assert "s3cret" not in shown and "sentinels-own" not in shown
    assert shown.count("***") == 3 and "10.0.0.3:26380/2?master_name=mymaster" in shown
    assert api._redact("redis://:pw@host:6379/0") == "redis://***@host:6379/0"


def test_plain_urls_are_unchanged_for_celery_and_rediss_verifies_the_certificate():
    assert celery_connection("redis://:pw@h:6379/0").url == "redis://:pw@h:6379/0"
    assert celery_connection("rediss://:pw@h:6380/0").url == "rediss://:pw@h:6380/0?ssl_cert_reqs=required"
    conf = make_celery(Settings(), broker_url="redis://127.0.0.1:1/0").conf
    assert "master_name" not in conf.broker_transport_options
    assert configured_broker_url(conf) == "redis://127.0.0.1:1/0"


def test_the_app_url_follows_a_broker_url_set_after_the_app_was_made():
    conf = make_celery(Settings(), broker_url=URL).conf
    conf.update(broker_url="redis://127.0.0.1:2/0")  # as worker.local does for its private Redis
    assert configured_broker_url(conf) == "redis://127.0.0.1:2/0"


def test_a_redis_socket_url_becomes_redis_pys_unix_socket_with_its_database():
    pool = redis_client("redis+socket:///tmp/redis.sock?virtual_host=4").connection_pool
    assert pool.connection_kwargs["path"] == "/tmp/redis.sock" and pool.connection_kwargs["db"] == 4


def test_sentinels_that_do_not_answer_are_a_short_broker_unavailable_message():
    url = f"sentinel://:hunter2@127.0.0.1:{free_port()};sentinel://127.0.0.1:{free_port()}/0?master_name=m"
    with pytest.raises(api.BrokerUnavailable) as error:
        api.connect(Settings(broker_url=url), attempts=1)
    message = str(error.value)
    assert "no sentinel named a master" in message and "hunter2" not in message and len(message) < 300
