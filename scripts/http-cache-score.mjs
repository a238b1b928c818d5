// Scores results of the HTTP cache test suite (http-cache-tests) as the
// suite's own display does with dependencies ignored: a test counts as
// passed when its own assertions held (result === true). Required tests
// are those of kind `required` (or none), optimal those of kind `optimal`.
//
// node http-cache-score.mjs SUITE_DIR OUR_RESULTS.json [NAME]
import fs from 'fs'
import path from 'path'

const [suiteDir, ours, name = 'CacheLayer'] = process.argv.slice(2)
const tests = (await import(path.resolve(suiteDir, 'tests/index.mjs'))).default

function score (results) {
  const s = { required: 0, requiredPassed: 0, optimal: 0, optimalPassed: 0, failing: [] }
  for (const suite of tests) {
    for (const test of suite.tests) {
      const result = results[test.id]
      if (test.kind === 'optimal') {
        s.optimal++
        if (result === true) s.optimalPassed++
      } else if (test.kind === 'required' || test.kind === undefined) {
        s.required++
        if (result === true) s.requiredPassed++
        else s.failing.push([test.id, result === undefined ? 'not run (browser only)' : JSON.stringify(result)])
      }
    }
  }
  return s
}

const rows = [[name, score(JSON.parse(fs.readFileSync(ours)))]]
for (const peer of ['nginx', 'varnish', 'squid', 'trafficserver']) {
  rows.push([`${peer} (published)`, score(JSON.parse(fs.readFileSync(path.resolve(suiteDir, `results/${peer}.json`))))])
}
console.log('| cache | required passed | optimal passed |')
console.log('|---|---|---|')
for (const [who, s] of rows) {
  console.log(`| ${who} | ${s.requiredPassed} of ${s.required} | ${s.optimalPassed} of ${s.optimal} |`)
}
console.log(`\nRequired tests ${name} fails:`)
for (const [id, why] of rows[0][1].failing) console.log(`- ${id}: ${why}`)

const [minRequired, minOptimal] = [process.env.MIN_REQUIRED, process.env.MIN_OPTIMAL].map(n => Number(n || 0))
const ourScore = rows[0][1]
if (ourScore.requiredPassed < minRequired || ourScore.optimalPassed < minOptimal) {
  console.log(`\nBelow the floor: required ${ourScore.requiredPassed} < ${minRequired} or optimal ${ourScore.optimalPassed} < ${minOptimal}`)
  process.exit(1)
}
