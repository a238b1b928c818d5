// Preloaded into the suite's test server: it listens on every interface
// by default; tests keep their traffic on loopback.
import http from 'http'

const listen = http.Server.prototype.listen
http.Server.prototype.listen = function (port, ...rest) {
  if (typeof port === 'number' || typeof port === 'string') return listen.call(this, port, '127.0.0.1', ...rest)
  return listen.call(this, port, ...rest)
}
