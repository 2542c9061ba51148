// FastAGI app written with ding-dong's own API (AGIServer(handler).start(port), context.*).
// Usage: node dingdong_app.js PORT SCRIPT...  (each SCRIPT a path, without query, it answers).
const AGIServer = require('ding-dong');
const port = parseInt(process.argv[2], 10);
const scripts = new Set(process.argv.slice(3));

const handler = function (context) {
  context.onEvent('variables').then(function (vars) {
    const path = (vars.agi_network_script || '').split('?')[0];
    if (!scripts.has(path)) return context.end();
    const seen = ['agi_network_script', 'agi_request', 'agi_arg_1', 'agi_arg_2', 'agi_x_fwd_for'].map(
      (key, i) => ['script', 'request', 'arg1', 'arg2', 'fwd'][i] + '=' + (key in vars ? vars[key] : '-')).join(';');
    return context.answer()
      .then(() => context.getVariable('CHANNEL'))
      .then(() => context.setVariable('AGI_SEEN', seen))
      .then(() => context.verbose('hello', 1))
      .then(() => context.exec('Wait', '0.2'))
      .then(() => context.end());
  }).catch(function (err) { console.error('error', err); context.end(); });
  context.on('error', function (err) { console.error('stream error', err.message); });
};

AGIServer(handler).start(port, '127.0.0.1');
console.log('READY');
