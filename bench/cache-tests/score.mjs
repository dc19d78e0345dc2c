// bench/cache-tests.sh: scores one results file of the http-cache-tests
// client with the suite's own determineTestResult, so dependencies between
// tests count as the suite means them. Usage: node score.mjs SUITE_DIR FILE

import fs from 'fs'
const [dir, file] = process.argv.slice(2)
const { determineTestResult } = await import(`${dir}/lib/display.mjs`)
const tests = (await import(`${dir}/tests/index.mjs`)).default
tests.push((await import(`${dir}/tests/surrogate-control.mjs`)).default)
const results = JSON.parse(fs.readFileSync(file, 'utf8'))
const count = { required: [0, 0], optimal: [0, 0], check: [0, 0] }
for (const suite of tests) {
  for (const test of suite.tests) {
    const kind = test.kind || 'required'
    const symbol = determineTestResult(tests, test.id, results)[2]
    count[kind][1] += 1
    if (symbol === '✅' || symbol === 'Y') count[kind][0] += 1
  }
}
console.log(JSON.stringify(count))
